//! A worker process of simulated users: one login, then one `ALPN_SESSION` connection per
//! session with one OPEN to a node (what `remoteler proxy ssh` does), then round trips of
//! small messages, then every stream at once, then one stream alone.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use frame::{ErrorCode, Open, Role, Session, SessionConfig};
use hdrhistogram::Histogram;
use tunnel::control::ALPN_SESSION;
use tunnel::identity::CaPin;
use tunnel::mux::{self, MuxStream, Tunnel};

use crate::identity;
use crate::net::{self, SourcePool};
use crate::proto::{Command, Message, UsersSpec, buckets};
use crate::sync::{Inbox, Semaphore, Signal};
use crate::worker::emit;

/// Bytes per write in the throughput phases: one DATA frame of the default size.
const CHUNK: usize = 16 * 1024;
/// Longest a phase may take per session before it counts as failed.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

/// One user session: its connection's mux and the single stream.
struct UserSession {
    tunnel: Tunnel,
    stream: MuxStream,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("histogram")
}

/// Counts finished tasks so the command loop can wait for all of them.
#[derive(Default)]
struct Countdown {
    done: Cell<usize>,
    signal: Signal,
}

impl Countdown {
    fn finish(&self) {
        self.done.set(self.done.get() + 1);
        self.signal.raise();
    }

    async fn wait(&self, total: usize) {
        loop {
            let seen = self.signal.generation();
            if self.done.get() >= total {
                return;
            }
            self.signal.changed(seen).await;
        }
    }
}

struct Users {
    spec: UsersSpec,
    sessions: RefCell<Vec<Option<Rc<UserSession>>>>,
    last_error: RefCell<Option<String>>,
}

impl Users {
    fn error(&self, e: impl std::fmt::Display) {
        *self.last_error.borrow_mut() = Some(e.to_string());
    }

    fn live(&self) -> Vec<Rc<UserSession>> {
        self.sessions.borrow().iter().flatten().cloned().collect()
    }
}

/// Runs the worker until `Stop` or the controller goes away.
pub async fn run(spec: UsersSpec, inbox: Inbox) -> anyhow::Result<()> {
    let users = Rc::new(Users {
        sessions: RefCell::new(Vec::new()),
        spec,
        last_error: RefCell::default(),
    });
    while let Some(line) = inbox.next().await {
        let command: Command = serde_json::from_str(&line).context("command from controller")?;
        match command {
            Command::Setup => setup(&users).await?,
            Command::Rounds => rounds(&users).await?,
            Command::Bulk => bulk(&users).await,
            Command::Single { bytes } => single(&users, bytes).await,
            Command::Stop => break,
            other => anyhow::bail!("a users worker cannot {other:?}"),
        }
    }
    for s in users.live() {
        s.tunnel.close(ErrorCode::NO_ERROR, "load test over");
    }
    Ok(())
}

async fn setup(users: &Rc<Users>) -> anyhow::Result<()> {
    let spec = &users.spec;
    let sources = Rc::new(SourcePool::for_worker(100 + spec.worker, 8));
    let pin: CaPin = spec.ca_pin.parse().context("ca pin")?;
    let started = Instant::now();
    let creds = identity::login(
        Some(sources.pick()),
        spec.users_addr,
        pin,
        &spec.user,
        &spec.password,
    )
    .await
    .context("login")?;
    let login_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut config = rustls::ClientConfig::clone(&*creds.client_config(ALPN_SESSION)?);
    // Each `remoteler proxy ssh` is a new process with no TLS session cache.
    config.resumption = rustls::client::Resumption::disabled();
    let config = Arc::new(config);
    *users.sessions.borrow_mut() = (0..spec.count).map(|_| None).collect();
    let hist = Rc::new(RefCell::new(histogram()?));
    let failed = Rc::new(Cell::new(0usize));
    let sem = Semaphore::new(spec.concurrency);
    let countdown = Rc::new(Countdown::default());
    for i in 0..spec.count {
        let users = users.clone();
        let (hist, failed, sem, countdown, sources, config) = (
            hist.clone(),
            failed.clone(),
            sem.clone(),
            countdown.clone(),
            sources.clone(),
            config.clone(),
        );
        monoio::spawn(async move {
            let _permit = sem.acquire().await;
            let t0 = Instant::now();
            match open_session(&users, i, &sources, config).await {
                Ok(session) => {
                    let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                    let _ = hist.borrow_mut().record(us.max(1));
                    users.sessions.borrow_mut()[i] = Some(Rc::new(session));
                }
                Err(e) => {
                    failed.set(failed.get() + 1);
                    users.error(format!("session setup: {e:#}"));
                }
            }
            countdown.finish();
        });
    }
    countdown.wait(spec.count).await;
    emit(&Message::SetupDone {
        login_ms,
        ok: spec.count - failed.get(),
        failed: failed.get(),
        setup_us: buckets(&hist.borrow()),
        last_error: users.last_error.borrow().clone(),
    });
    Ok(())
}

async fn open_session(
    users: &Users,
    i: usize,
    sources: &SourcePool,
    config: Arc<rustls::ClientConfig>,
) -> anyhow::Result<UserSession> {
    let spec = &users.spec;
    let conn =
        net::connect_tls(Some(sources.pick()), spec.users_addr, config, ALPN_SESSION).await?;
    let mut session_config = SessionConfig::new(Role::Client, true);
    session_config.resume_grace = Duration::ZERO;
    let mut id = [0u8; 16];
    let _ = getrandom::fill(&mut id);
    let tunnel = Tunnel::new(Session::new(session_config, id, Instant::now()));
    {
        let tunnel = tunnel.clone();
        monoio::spawn(async move { mux::drive(&tunnel, conn, BytesMut::new()).await });
    }
    let global = spec.first + i;
    let request = Open {
        session_id: id,
        cluster: String::new(),
        node: format!("{}{}", spec.prefix, global % spec.nodes.max(1)),
        service: "ssh".to_owned(),
        user: spec.user.clone(),
        login: "root".to_owned(),
        client_addr: String::new(),
        credential: Bytes::new(),
    };
    let stream = monoio::time::timeout(Duration::from_secs(30), tunnel.open(request))
        .await
        .context("no answer to OPEN within 30 s")??;
    Ok(UserSession { tunnel, stream })
}

async fn rounds(users: &Rc<Users>) -> anyhow::Result<()> {
    let spec = &users.spec;
    let message = Bytes::from(vec![0x5a; spec.msg_bytes.max(1)]);
    let hist = Rc::new(RefCell::new(histogram()?));
    let failed = Rc::new(Cell::new(0usize));
    let countdown = Rc::new(Countdown::default());
    let live = users.live();
    let total = live.len();
    for session in live {
        let (users, hist, failed, countdown, message) = (
            users.clone(),
            hist.clone(),
            failed.clone(),
            countdown.clone(),
            message.clone(),
        );
        let rounds = spec.rounds;
        monoio::spawn(async move {
            let run = async {
                for _ in 0..rounds {
                    let t0 = Instant::now();
                    session.stream.write(message.clone()).await?;
                    let mut got = 0;
                    while got < message.len() {
                        match session.stream.read().await? {
                            Some(b) => got += b.len(),
                            None => anyhow::bail!("the echo ended early"),
                        }
                    }
                    let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                    let _ = hist.borrow_mut().record(us.max(1));
                }
                Ok::<(), anyhow::Error>(())
            };
            match monoio::time::timeout(PHASE_TIMEOUT, run).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failed.set(failed.get() + 1);
                    users.error(format!("round trip: {e:#}"));
                }
                Err(_) => {
                    failed.set(failed.get() + 1);
                    users.error("round trips timed out");
                }
            }
            countdown.finish();
        });
    }
    countdown.wait(total).await;
    emit(&Message::RoundsDone {
        rtt_us: buckets(&hist.borrow()),
        failed: failed.get(),
        last_error: users.last_error.borrow().clone(),
    });
    Ok(())
}

/// Sends `bytes` on the session's stream and reads the echo; (start ns, end ns).
async fn transfer(session: &Rc<UserSession>, bytes: u64) -> anyhow::Result<(u64, u64)> {
    let chunk = Bytes::from(vec![0xa5; CHUNK]);
    let start = net::mono_ns();
    let writer = {
        let session = session.clone();
        monoio::spawn(async move {
            let mut left = bytes;
            while left > 0 {
                let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                session.stream.write(chunk.slice(..n)).await?;
                left -= n as u64;
            }
            Ok::<(), tunnel::mux::StreamError>(())
        })
    };
    let mut got = 0u64;
    while got < bytes {
        match session.stream.read().await? {
            Some(b) => got += b.len() as u64,
            None => anyhow::bail!("the echo ended after {got} of {bytes} bytes"),
        }
    }
    writer.await?;
    Ok((start, net::mono_ns()))
}

async fn bulk(users: &Rc<Users>) {
    let spec = &users.spec;
    let rates = Rc::new(RefCell::new(Vec::new()));
    let span = Rc::new(Cell::new((u64::MAX, 0u64)));
    let failed = Rc::new(Cell::new(0usize));
    let countdown = Rc::new(Countdown::default());
    let live = users.live();
    let total = live.len();
    let bytes = spec.bulk_bytes;
    for session in live {
        let (users, rates, span, failed, countdown) = (
            users.clone(),
            rates.clone(),
            span.clone(),
            failed.clone(),
            countdown.clone(),
        );
        monoio::spawn(async move {
            match monoio::time::timeout(PHASE_TIMEOUT, transfer(&session, bytes)).await {
                Ok(Ok((start, end))) => {
                    let secs = (end.saturating_sub(start)) as f64 / 1e9;
                    rates.borrow_mut().push(bytes as f64 / secs.max(1e-9));
                    let (s, e) = span.get();
                    span.set((s.min(start), e.max(end)));
                }
                Ok(Err(e)) => {
                    failed.set(failed.get() + 1);
                    users.error(format!("bulk: {e:#}"));
                }
                Err(_) => {
                    failed.set(failed.get() + 1);
                    users.error("bulk transfer timed out");
                }
            }
            countdown.finish();
        });
    }
    countdown.wait(total).await;
    let per_stream_bps = rates.borrow().clone();
    let (start_ns, end_ns) = span.get();
    emit(&Message::BulkDone {
        bytes: bytes * per_stream_bps.len() as u64,
        per_stream_bps,
        start_ns,
        end_ns,
        failed: failed.get(),
        last_error: users.last_error.borrow().clone(),
    });
}

async fn single(users: &Rc<Users>, bytes: u64) {
    let Some(session) = users.live().into_iter().next() else {
        emit(&Message::SingleDone {
            bytes: 0,
            elapsed_ns: 0,
            error: Some("no session is up".to_owned()),
        });
        return;
    };
    let message = match monoio::time::timeout(PHASE_TIMEOUT, transfer(&session, bytes)).await {
        Ok(Ok((start, end))) => Message::SingleDone {
            bytes,
            elapsed_ns: end.saturating_sub(start),
            error: None,
        },
        Ok(Err(e)) => Message::SingleDone {
            bytes: 0,
            elapsed_ns: 0,
            error: Some(format!("{e:#}")),
        },
        Err(_) => Message::SingleDone {
            bytes: 0,
            elapsed_ns: 0,
            error: Some("timed out".to_owned()),
        },
    };
    emit(&message);
}
