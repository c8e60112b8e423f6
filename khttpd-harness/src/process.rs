//! Child processes that cannot outlive the test or bench that started them: [`Guarded`] stops
//! its child when dropped, and every wait here is bounded. Only a child started here is ever
//! signalled, by its pid.

use std::{
    io::Read as _,
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
pub use rustix::process::Signal;

/// Longest a child may take to exit after each stop signal before the next (finally SIGKILL).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a server may take to load its programs and start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process that is stopped when dropped: each signal of `stop` in turn, each followed by
/// a bounded wait, then SIGKILL as a last resort.
pub struct Guarded {
    child: Child,
    name: &'static str,
    stop: &'static [Signal],
}

impl Guarded {
    pub fn new(child: Child, name: &'static str, stop: &'static [Signal]) -> Self {
        Self { child, name, stop }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// An error if the process has exited (it should be serving).
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited during start-up ({status})", self.name);
        }
        Ok(())
    }

    /// Sends `signal` (unless it has exited) and waits up to `limit` for the exit.
    pub fn signal_and_wait(&mut self, signal: Signal, limit: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        if let Some(pid) = i32::try_from(self.pid())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            // Not yet reaped (try_wait said so): the pid is still this child's.
            let _ = rustix::process::kill_process(pid, signal);
        }
        wait_bounded(&mut self.child, limit)
    }

    /// Stops it the way `stop` says; an error (after SIGKILL) if it ignored every signal.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        for &signal in self.stop {
            if let Some(status) = self.signal_and_wait(signal, STOP_TIMEOUT) {
                return Ok(status);
            }
            eprintln!("{} (pid {}) ignored {signal:?}", self.name, self.pid());
        }
        let _ = self.signal_and_wait(Signal::KILL, STOP_TIMEOUT);
        bail!("{} ignored {:?}: killed", self.name, self.stop)
    }

    /// Polls `ready` until it holds, the process exits, or [`START_TIMEOUT`] passes.
    pub fn wait_until(
        &mut self,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.ensure_running()?;
            if ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not answer on {what} within {START_TIMEOUT:?}",
                    self.name
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Waits up to `limit` for `child` to exit.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().ok()? {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `command` to completion with its output captured, killing it after `limit`.
pub fn output_bounded(command: &mut Command, limit: Duration) -> anyhow::Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {:?}", command.get_program()))?;
    // Read both pipes while waiting, so a chatty child cannot block on a full pipe.
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let Some(status) = wait_bounded(&mut child, limit) else {
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "{:?} still running after {limit:?}: killed",
            command.get_program()
        );
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}
