//! the proxy appliance

fn main() {
    eprintln!("remoteler-proxy: not built yet");
    std::process::exit(2);
}
