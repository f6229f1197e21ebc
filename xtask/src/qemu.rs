//! Runs QEMU with a time limit: serial captured to a file (and echoed when asked), the child
//! killed if the runner goes away, the result decoded from `isa-debug-exit`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_scenarios::Exit;

use crate::Result;

/// Kills the child when dropped (a runner that panics or times out leaves no emulator behind).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a run produced.
pub struct RunResult {
    /// How it ended.
    pub exit: Exit,
    /// Everything the serial port printed.
    pub serial: String,
    /// QEMU's own stderr.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs `qemu-system-x86_64 args`, capturing serial (stdout) into `log`.
pub fn run(args: &[String], log: &Path, echo: bool, timeout: Duration) -> Result<RunResult> {
    let start = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let mut child = KillOnDrop(child);
    let serial = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let stdout = child.0.stdout.take().expect("piped stdout");
    let sink = serial.clone();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut line) {
            if n == 0 {
                break;
            }
            let _ = file.write_all(&line);
            if echo {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&line);
                let _ = out.flush();
            }
            sink.lock().unwrap().extend_from_slice(&line);
            line.clear();
        }
    });
    let mut stderr_pipe = child.0.stderr.take().expect("piped stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });
    let exit = loop {
        if let Some(status) = child.0.try_wait()? {
            break Exit::from_status(status.code());
        }
        if start.elapsed() > timeout {
            let _ = child.0.kill();
            let _ = child.0.wait();
            break Exit::Timeout;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(child);
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    let serial = String::from_utf8_lossy(&serial.lock().unwrap()).into_owned();
    Ok(RunResult {
        exit,
        serial,
        stderr,
        elapsed: start.elapsed(),
    })
}
