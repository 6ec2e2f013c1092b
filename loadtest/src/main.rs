//! load-test harness

fn main() {
    eprintln!("remoteler-loadtest: not built yet");
    std::process::exit(2);
}
