//! the edge agent

fn main() {
    eprintln!("remoteler-agent: not built yet");
    std::process::exit(2);
}
