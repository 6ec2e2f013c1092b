//! The frame of reference: a trivial monoio echo server holding plain TCP connections, and
//! the worker that opens them. What the proxy costs per tunnel is compared with what this
//! costs per connection.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;

use anyhow::Context as _;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};

use crate::net::{self, SourcePool};
use crate::proto::{Command, Message, PlainSpec};
use crate::sync::{Inbox, Semaphore, Signal};
use crate::worker::emit;

/// Read buffer of each echo connection: what a trivial server keeps per connection.
pub const ECHO_BUFFER: usize = 4096;

/// `echo-server`: listens on `listen`, prints `listening ADDR`, echoes every connection.
pub fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .context("monoio runtime")?;
    rt.block_on(async {
        let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
        println!("listening {}", listener.local_addr()?);
        use std::io::Write;
        std::io::stdout().flush()?;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(a) => a,
                Err(_) => {
                    monoio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small echoes leave at once (rtt's messages); no effect on idle memory.
            let _ = stream.set_nodelay(true);
            monoio::spawn(echo(stream));
        }
    })
}

async fn echo(mut stream: TcpStream) {
    let mut buf = Vec::with_capacity(ECHO_BUFFER);
    loop {
        let (res, b) = stream.read(buf).await;
        match res {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let (res, b) = stream.write_all(b).await;
                if res.is_err() {
                    return;
                }
                buf = b;
                buf.clear();
            }
        }
    }
}

/// The worker: opens `count` connections on `Connect`, holds them until `Stop`.
pub async fn run(spec: PlainSpec, inbox: Inbox) -> anyhow::Result<()> {
    let held: Rc<RefCell<Vec<TcpStream>>> = Rc::default();
    while let Some(line) = inbox.next().await {
        let command: Command = serde_json::from_str(&line).context("command from controller")?;
        match command {
            Command::Connect => connect_all(&spec, &held).await,
            Command::Stop => break,
            other => anyhow::bail!("a plain worker cannot {other:?}"),
        }
    }
    Ok(())
}

async fn connect_all(spec: &PlainSpec, held: &Rc<RefCell<Vec<TcpStream>>>) {
    let sources = Rc::new(SourcePool::for_worker(200 + spec.worker, spec.sources));
    let sem = Semaphore::new(spec.concurrency);
    let failed = Rc::new(Cell::new(0usize));
    let done = Rc::new(Cell::new(0usize));
    let signal = Signal::default();
    let last_error: Rc<RefCell<Option<String>>> = Rc::default();
    for _ in 0..spec.count {
        let (sources, sem, failed, done, signal, held, last_error) = (
            sources.clone(),
            sem.clone(),
            failed.clone(),
            done.clone(),
            signal.clone(),
            held.clone(),
            last_error.clone(),
        );
        let addr: SocketAddr = spec.addr;
        monoio::spawn(async move {
            let _permit = sem.acquire().await;
            match net::connect_from(Some(sources.pick()), addr).await {
                Ok(s) => held.borrow_mut().push(s),
                Err(e) => {
                    failed.set(failed.get() + 1);
                    *last_error.borrow_mut() = Some(format!("{e:#}"));
                }
            }
            done.set(done.get() + 1);
            signal.raise();
        });
    }
    loop {
        let seen = signal.generation();
        if done.get() >= spec.count {
            break;
        }
        signal.changed(seen).await;
    }
    emit(&Message::Joined {
        ok: spec.count - failed.get(),
        failed: failed.get(),
        last_error: last_error.borrow().clone(),
        join_us: Vec::new(),
    });
}
