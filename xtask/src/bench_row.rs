//! What the QEMU benchmarks (`bench dma`, `bench nvme`) share: the hypervisor's per-phase
//! cycles, reading a guest's `tag key=value ...` result line into a row by field name, one
//! measured QEMU run of the test guest, and the JSON file of rows.

use std::path::Path;
use std::time::Duration;

use moat_scenarios::{BootModule, Exit, TEST_GUEST};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{make_iso_with_modules, module_files, qemu, root, Result};

/// The hypervisor's cycles per operation, by phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Phases {
    pub(crate) exit: f64,
    pub(crate) validate: f64,
    pub(crate) iova_alloc: f64,
    pub(crate) pte_write: f64,
    pub(crate) invalidate: f64,
    pub(crate) iova_free: f64,
}

impl Phases {
    /// The six phases in order: exit, validate, IOVA alloc, PTE write, invalidate, IOVA free.
    pub(crate) fn values(&self) -> [f64; 6] {
        [
            self.exit,
            self.validate,
            self.iova_alloc,
            self.pte_write,
            self.invalidate,
            self.iova_free,
        ]
    }
}

/// The rows' `emulated` field: every figure comes from QEMU TCG.
pub(crate) fn emulated() -> String {
    "QEMU TCG".into()
}

/// A guest line `... <tag> policy=.. key=value ...` as a row `R` and its [`Phases`]: the
/// `key=value` pairs after `tag` become a JSON object (numbers where they parse), which fills
/// both by name (keys neither wants are ignored). `None` when the line is not one, or lacks a
/// field either needs.
pub(crate) fn parse_fields<R: DeserializeOwned>(line: &str, tag: &str) -> Option<(R, Phases)> {
    let start = line.find(&format!("{tag} policy="))? + tag.len() + 1;
    let mut fields = Map::new();
    for kv in line[start..].split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        let v = if let Ok(n) = v.parse::<u64>() {
            Value::from(n)
        } else if let Ok(x) = v.parse::<f64>() {
            Value::from(x)
        } else {
            Value::from(v)
        };
        fields.insert(k.to_string(), v);
    }
    let fields = Value::Object(fields);
    let row = serde_json::from_value(fields.clone()).ok()?;
    let phases = serde_json::from_value(fields).ok()?;
    Some((row, phases))
}

/// One measured QEMU run `name` of the test guest (command line `guest`) under `kernel`
/// (command line `cmdline`), with QEMU's arguments from `qemu_args` given the ISO: the rows
/// `parse` finds in its serial output, or an error (QEMU's exit, the rows found, the log)
/// unless QEMU exited with success and `complete` accepts the rows.
pub(crate) fn run_guest<R>(
    kernel: &Path,
    cmdline: &str,
    guest: String,
    name: &str,
    qemu_args: impl FnOnce(&str) -> Vec<String>,
    parse: fn(&str) -> Option<R>,
    complete: impl FnOnce(&[R]) -> bool,
) -> Result<Vec<R>> {
    let modules = module_files(&[BootModule {
        file: TEST_GUEST,
        cmdline: guest,
    }])?;
    let iso = make_iso_with_modules(kernel, cmdline, &modules, name)?;
    let args = qemu_args(&iso.to_string_lossy());
    let log = root().join(format!("target/xtask/{name}.log"));
    let r = qemu::run(&args, &log, false, Duration::from_secs(900))?;
    let found: Vec<R> = r.serial.lines().filter_map(parse).collect();
    if r.exit != Exit::Success || !complete(&found) {
        return Err(format!(
            "{} with {} result lines (log: {})",
            r.exit,
            found.len(),
            log.display()
        )
        .into());
    }
    Ok(found)
}

/// Writes `rows` to `path` (its folder created) as a JSON array, one row per line.
pub(crate) fn write_json<R: Serialize>(rows: &[R], path: &Path) -> Result<()> {
    let lines = rows
        .iter()
        .map(|r| serde_json::to_string(r).map(|s| format!("  {s}")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(path, format!("[\n{}\n]\n", lines.join(",\n")))?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

/// The policies `MOAT_BENCH_POLICIES` names (e.g. `passthrough,batched`), in `all`'s order;
/// every one of `all` when unset. An unknown name is an error.
pub(crate) fn env_policies(all: &[&str]) -> Result<Vec<String>> {
    let Some(v) = std::env::var("MOAT_BENCH_POLICIES")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        return Ok(all.iter().map(|p| p.to_string()).collect());
    };
    let asked: Vec<&str> = v.split(',').map(str::trim).collect();
    if let Some(p) = asked.iter().find(|p| !all.contains(p)) {
        return Err(format!(
            "MOAT_BENCH_POLICIES: unknown policy `{p}` (known: {})",
            all.join(", ")
        )
        .into());
    }
    Ok(all
        .iter()
        .filter(|p| asked.contains(p))
        .map(|p| p.to_string())
        .collect())
}

/// Extra QEMU arguments from `MOAT_BENCH_QEMU_ARGS` (split at white space), appended to a
/// benchmark's QEMU command line: e.g. a TCG plugin (`-plugin ...`, see `tools/tbprof`).
pub(crate) fn extra_qemu_args() -> Vec<String> {
    std::env::var("MOAT_BENCH_QEMU_ARGS")
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// The median of `v` (NaN when empty; the mean of the middle two for an even count).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One row per key of `rows` (first-seen order): the run whose `value` is the median of its
/// key's runs (the upper middle one for an even count), with every run's value.
pub(crate) fn median_runs<R: Clone, K: PartialEq>(
    rows: &[R],
    key: impl Fn(&R) -> K,
    value: impl Fn(&R) -> f64,
) -> Vec<(R, Vec<f64>)> {
    let mut keys: Vec<K> = Vec::new();
    for r in rows {
        let k = key(r);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.iter()
        .map(|k| {
            let mut runs: Vec<&R> = rows.iter().filter(|r| key(r) == *k).collect();
            let all: Vec<f64> = runs.iter().map(|r| value(r)).collect();
            runs.sort_by(|a, b| value(a).total_cmp(&value(b)));
            (runs[runs.len() / 2].clone(), all)
        })
        .collect()
}

/// The number of interleaved rounds: `MOAT_BENCH_ROUNDS`, else `default`.
pub(crate) fn env_rounds(default: u32) -> Result<u32> {
    match std::env::var("MOAT_BENCH_ROUNDS")
        .ok()
        .filter(|v| !v.is_empty())
    {
        None => Ok(default),
        Some(v) => v
            .parse::<u32>()
            .map(|n| n.max(1))
            .map_err(|_| format!("MOAT_BENCH_ROUNDS: `{v}` is not a number").into()),
    }
}
