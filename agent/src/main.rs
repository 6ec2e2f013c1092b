//! `remoteler-agent`: parses the command line, sets up logging and a single-threaded monoio
//! runtime, and runs [`agent::run`]. Everything else lives in the library.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agent::cli::{Args, Command};

static SHUTDOWN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    SHUTDOWN.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(signal, handler);
        }
    }
}

async fn shutdown_requested() {
    while !SHUTDOWN.load(Ordering::SeqCst) {
        monoio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn main() {
    tunnel::allocator::tune_for_receive_buffers();
    let args: Args = argh::from_env();
    let Command::Start(start) = args.command;
    let config = match start.to_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("remoteler-agent: {e}");
            std::process::exit(2);
        }
    };
    agent::init_logging(&config.log);
    install_signal_handlers();
    // FusionDriver: io_uring where the kernel has it, epoll otherwise (old kernels, qemu-user).
    let runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build();
    let mut runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("remoteler-agent: cannot start the I/O runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(agent::run(config, shutdown_requested())) {
        eprintln!("remoteler-agent: {e}");
        std::process::exit(1);
    }
}
