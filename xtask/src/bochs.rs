//! Runs Bochs with a time limit on a [`BochsMachine`]: writes the bochsrc and the `-rc` file
//! (`c`: leave Bochs's debugger and run), watches the COM1 file for the hypervisor's final
//! `moat: exit` line (Bochs has no `isa-debug-exit`) and Bochs's log for a reset (triple
//! fault), and stops Bochs at whichever comes first, or at the time limit.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_scenarios::bochs::BOCHS_RESET_LINE;
use moat_scenarios::{BochsMachine, Exit};

use crate::qemu::{KillOnDrop, RunResult};
use crate::Result;

/// Boots `iso` on `machine` under Bochs. Files go into `dir` (bochsrc, rc, Bochs's log, its
/// screen); the serial output is copied to `log` (and echoed as it comes when `echo`).
pub fn run(
    machine: &BochsMachine,
    iso: &Path,
    dir: &Path,
    log: &Path,
    echo: bool,
    timeout: Duration,
) -> Result<RunResult> {
    std::fs::create_dir_all(dir)?;
    let serial_path = dir.join("com1.txt");
    let bochs_log = dir.join("bochs.log");
    // Stale files would be read as this run's output.
    let _ = std::fs::remove_file(&serial_path);
    let _ = std::fs::remove_file(&bochs_log);
    let rc = dir.join("bochsrc");
    std::fs::write(
        &rc,
        machine.bochsrc(
            &iso.to_string_lossy(),
            &serial_path.to_string_lossy(),
            &bochs_log.to_string_lossy(),
        ),
    )?;
    let cont = dir.join("continue.rc");
    std::fs::write(&cont, "c\n")?;
    let screen = std::fs::File::create(dir.join("screen.txt"))?;
    let start = Instant::now();
    let child = Command::new("bochs")
        .arg("-q")
        .arg("-f")
        .arg(&rc)
        .arg("-rc")
        .arg(&cont)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(screen.try_clone()?)
        .stderr(screen)
        .spawn()
        .map_err(|e| format!("cannot start bochs: {e}"))?;
    let mut child = KillOnDrop(child);
    let mut shown = 0;
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let exit = loop {
        let serial = read(&serial_path);
        if echo && serial.len() > shown {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&serial.as_bytes()[shown..]);
            let _ = out.flush();
            shown = serial.len();
        }
        if let Some(e) = Exit::from_serial(&serial) {
            // Let the last lines after the result (`moat: halted`) reach the file.
            std::thread::sleep(Duration::from_millis(300));
            break e;
        }
        if read(&bochs_log).contains(BOCHS_RESET_LINE) {
            break Exit::Reset;
        }
        if let Some(status) = child.0.try_wait()? {
            break Exit::Other(status.code());
        }
        if start.elapsed() > timeout {
            break Exit::Timeout;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(child);
    let serial = read(&serial_path);
    std::fs::write(log, &serial).map_err(|e| format!("{}: {e}", log.display()))?;
    // What Bochs said about the CPUs (a reset's register dump, errors) stands in for QEMU's
    // stderr in the reports.
    let mut stderr = read(&bochs_log)
        .lines()
        .filter(|l| {
            l.contains("e[")
                || l.contains("p[")
                || l.contains(BOCHS_RESET_LINE)
                || l.contains("CPU is in")
                || l.contains("| RIP")
                || l.contains("CR0=")
        })
        .collect::<Vec<_>>()
        .join("\n");
    if matches!(exit, Exit::Other(_)) {
        // Bochs ended by itself (a bad bochsrc, a missing plugin or ROM): it says why on its
        // terminal, which went to the screen file.
        let screen = read(&dir.join("screen.txt"));
        let tail: Vec<&str> = screen.lines().rev().take(15).collect();
        stderr.push_str("\n--- Bochs terminal ---\n");
        stderr.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    Ok(RunResult {
        exit,
        serial,
        stderr,
        elapsed: start.elapsed(),
    })
}
