//! `remoteler-proxy`: parses the command line and hands it to [`proxy::cli::run`].

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: proxy::cli::Args = argh::from_env();
    match proxy::cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remoteler-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
