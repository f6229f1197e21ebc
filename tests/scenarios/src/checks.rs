//! Checks over a serial log.

/// A line containing every one of `parts`, or an error naming them.
pub fn need_line(log: &str, parts: &[&str]) -> Result<(), String> {
    if log.lines().any(|l| parts.iter().all(|p| l.contains(p))) {
        Ok(())
    } else {
        Err(format!("no line containing all of {parts:?}"))
    }
}

/// No line may contain every one of `parts`.
pub fn forbid_line(log: &str, parts: &[&str]) -> Result<(), String> {
    match log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
        Some(l) => Err(format!("unexpected line: {l:?}")),
        None => Ok(()),
    }
}

/// No line of `test`'s own checks (the guest's lines that start with `test`) says `WRONG`.
pub fn no_wrong(log: &str, test: &str) -> Result<(), String> {
    match log
        .lines()
        .find(|l| l.contains(test) && l.contains("WRONG"))
    {
        Some(l) => Err(format!("wrong answer: {l}")),
        None => Ok(()),
    }
}

/// The boot ran to the end: W^X paging checked, no error lines, "boot complete".
pub fn boot_complete(log: &str) -> Result<(), String> {
    need_line(log, &["paging: W^X enforced"])?;
    need_line(log, &["moat: boot complete"])?;
    forbid_line(log, &["FATAL"])?;
    forbid_line(log, &["PANIC"])
}

/// Exactly `n` CPUs online and each AP reported from its own CPU.
pub fn smp(log: &str, n: usize) -> Result<(), String> {
    need_line(
        log,
        &[&format!("smp: {n} of {n} CPUs online ({n} listed by ACPI)")],
    )?;
    for k in 1..n {
        // The line is printed by CPU k itself (the log prefix is the running CPU's index).
        need_line(log, &[&format!("cpu{k} smp: cpu{k} online (APIC id")])?;
    }
    forbid_line(log, &["did not start"])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
[    0.1] INFO  cpu0 platform: paging: W^X enforced (text RX, ...)
[    0.2] INFO  cpu1 smp: cpu1 online (APIC id 1)
[    0.3] INFO  cpu0 platform: smp: 2 of 2 CPUs online (2 listed by ACPI)
moat: boot complete
";

    #[test]
    fn smp_check_needs_every_ap_line_from_its_own_cpu() {
        assert!(smp(LOG, 2).is_ok());
        assert!(smp(LOG, 4).is_err());
        let forged = LOG.replace("cpu1 smp: cpu1", "cpu0 smp: cpu1");
        assert!(smp(&forged, 2).is_err());
    }

    #[test]
    fn boot_complete_rejects_fatal_lines() {
        assert!(boot_complete(LOG).is_ok());
        assert!(boot_complete(&format!("{LOG}moat: FATAL exception\n")).is_err());
        assert!(boot_complete("moat: boot complete\n").is_err());
    }
}
