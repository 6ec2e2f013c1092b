//! `remoteler-proxy`: parses the command line and hands it to [`proxy::cli::run`].

use std::process::ExitCode;

fn main() -> ExitCode {
    tunnel::allocator::tune_for_receive_buffers();
    let args: proxy::cli::Args = argh::from_env();
    if !args.is_server() {
        // A one-shot command piped into `head` or `grep -q` ends quietly, with status 0, when
        // the reader goes away (not a panic in `println!`, nor a 141 that fails a `pipefail`
        // script whose grep matched). The server keeps SIGPIPE ignored: a peer closing a
        // socket is an error to handle there, not a reason to exit.
        // SAFETY: installing a handler that only calls the async-signal-safe `_exit`, before
        // any thread is started.
        unsafe {
            libc::signal(
                libc::SIGPIPE,
                on_broken_pipe as *const () as libc::sighandler_t,
            );
        }
    }
    match proxy::cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remoteler-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

extern "C" fn on_broken_pipe(_: libc::c_int) {
    // SAFETY: `_exit` is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(0) }
}
