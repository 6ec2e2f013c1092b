//! the user's command

fn main() {
    eprintln!("remoteler: not built yet");
    std::process::exit(2);
}
