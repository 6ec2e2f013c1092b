//! The controller's side of the worker processes: it starts them (re-executing this
//! binary as `worker --spec JSON`), sends commands, and collects their messages.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::proto::{self, AgentCounters, Message, WorkerSpec};

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// Running workers.
pub struct Pool {
    workers: Vec<Worker>,
    rx: Receiver<(usize, Message)>,
    tx: Sender<(usize, Message)>,
    /// The latest progress of each worker (agents workers only).
    pub progress: Vec<AgentCounters>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl Default for Pool {
    fn default() -> Self {
        let (tx, rx) = channel();
        Pool {
            workers: Vec::new(),
            rx,
            tx,
            progress: Vec::new(),
        }
    }
}

impl Pool {
    /// Starts one worker process.
    pub fn spawn(&mut self, spec: &WorkerSpec) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("locate this binary")?;
        let mut child = Command::new(exe)
            .arg("worker")
            .arg("--spec")
            .arg(serde_json::to_string(spec)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start a worker process")?;
        let id = self.workers.len();
        let stdout = child.stdout.take().context("worker stdout")?;
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Message>(&line) {
                    Ok(m) => {
                        if tx.send((id, m)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let error = format!("unreadable message from worker {id}: {e}: {line}");
                        let _ = tx.send((id, Message::Fatal { error }));
                    }
                }
            }
            let error = format!("worker {id} exited");
            let _ = tx.send((id, Message::Fatal { error }));
        });
        let stdin = child.stdin.take();
        self.workers.push(Worker { child, stdin });
        self.progress.push(AgentCounters::default());
        Ok(())
    }

    /// Sends `command` to worker `id`.
    pub fn send(&mut self, id: usize, command: &proto::Command) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(command)?;
        line.push(b'\n');
        let stdin = self.workers[id]
            .stdin
            .as_mut()
            .context("worker stdin closed")?;
        stdin
            .write_all(&line)
            .and_then(|()| stdin.flush())
            .with_context(|| format!("send a command to worker {id}"))
    }

    /// Sends `command` to every worker.
    pub fn broadcast(&mut self, command: &proto::Command) -> anyhow::Result<()> {
        for id in 0..self.workers.len() {
            self.send(id, command)?;
        }
        Ok(())
    }

    /// Sum of the latest agent progress.
    pub fn totals(&self) -> AgentCounters {
        let mut t = AgentCounters::default();
        for p in &self.progress {
            t.up += p.up;
            t.connects += p.connects;
            t.resumed += p.resumed;
            t.disconnects += p.disconnects;
            t.failures += p.failures;
            t.joined += p.joined;
            if p.last_error.is_some() {
                t.last_error = p.last_error.clone();
            }
        }
        t
    }

    /// Handles one message or times out after `wait`; progress is recorded, a fatal message
    /// is an error, anything else is returned.
    pub fn next(&mut self, wait: Duration) -> anyhow::Result<Option<(usize, Message)>> {
        match self.rx.recv_timeout(wait) {
            Ok((id, Message::Progress(p))) => {
                self.progress[id] = p;
                Ok(None)
            }
            Ok((id, Message::Fatal { error })) => bail!("worker {id}: {error}"),
            Ok(other) => Ok(Some(other)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => bail!("every worker is gone"),
        }
    }

    /// Waits for one message from each worker for which `pick` returns `Some`, calling `tick`
    /// between messages; gives up after `timeout`.
    pub fn collect<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(Message) -> Option<T>,
        mut tick: impl FnMut(&Pool),
    ) -> anyhow::Result<Vec<T>> {
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Option<T>> = (0..self.workers.len()).map(|_| None).collect();
        while got.iter().any(Option::is_none) {
            if Instant::now() > deadline {
                bail!("workers did not answer within {timeout:?}");
            }
            if let Some((id, m)) = self.next(Duration::from_millis(100))? {
                if let Some(v) = pick(m) {
                    got[id] = Some(v);
                }
            }
            tick(self);
        }
        Ok(got.into_iter().flatten().collect())
    }

    /// Waits until `done` holds for the agent totals, calling `tick`; false on timeout.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&AgentCounters) -> bool,
        mut tick: impl FnMut(&Pool),
    ) -> anyhow::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.totals()) {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            let _ = self.next(Duration::from_millis(100))?;
            tick(self);
        }
    }

    /// Keeps draining progress for `duration`, calling `tick`.
    pub fn idle(&mut self, duration: Duration, mut tick: impl FnMut(&Pool)) -> anyhow::Result<()> {
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = self.next(left.min(Duration::from_millis(100)))?;
            tick(self);
        }
        Ok(())
    }

    /// Stops every worker (closing stdin ends them; then they are killed).
    pub fn shutdown(&mut self) {
        for w in &mut self.workers {
            if let Some(mut stdin) = w.stdin.take() {
                let _ = stdin.write_all(b"\"stop\"\n");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for w in &mut self.workers {
            while Instant::now() < deadline {
                if matches!(w.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
        self.workers.clear();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}
