//! SVG plots of the benchmarks (the `plotters` crate's SVG backend), written next to their
//! JSON: the hypervisor's phases per operation as stacked bars per policy and batch size
//! (`bench dma`), and IOPS per policy for every NVMe workload (`bench nvme`).

use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::bench_row::Phases;
use crate::Result;

/// Colours of the four policies (passthrough, strict, batched, deferred).
const POLICY_COLOURS: [RGBColor; 4] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0xc4, 0x4e, 0x52),
    RGBColor(0x55, 0xa8, 0x68),
    RGBColor(0xdd, 0x84, 0x52),
];

/// Colours and names of the six phases, bottom to top.
const PHASES: [(&str, RGBColor); 6] = [
    ("exit", RGBColor(0x8c, 0x8c, 0x8c)),
    ("validate", RGBColor(0x4c, 0x72, 0xb0)),
    ("IOVA alloc", RGBColor(0x55, 0xa8, 0x68)),
    ("PTE write", RGBColor(0xc4, 0x4e, 0x52)),
    ("invalidate + wait", RGBColor(0x81, 0x72, 0xb3)),
    ("IOVA free", RGBColor(0xcc, 0xb9, 0x74)),
];

/// One bar of a stacked phase chart.
pub(crate) struct PhaseBar<'a> {
    /// Category label under the bar (e.g. `strict@64`).
    pub(crate) label: String,
    /// The phases' cycles per operation.
    pub(crate) phases: &'a Phases,
}

/// Stacked bars of the hypervisor's phases, one chart per panel (e.g. one per buffer size),
/// side by side, into `path`.
pub(crate) fn phase_bars(
    panels: &[(String, Vec<PhaseBar<'_>>)],
    title: &str,
    y_desc: &str,
    path: &Path,
) -> Result<()> {
    let width = 140 + 84 * panels.iter().map(|p| p.1.len()).sum::<usize>() as u32;
    let root = SVGBackend::new(path, (width.max(640), 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 18))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for ((name, bars), area) in panels.iter().zip(areas.iter()) {
        let top = bars
            .iter()
            .map(|b| b.phases.values().iter().sum::<f64>())
            .fold(1.0, f64::max)
            * 1.1;
        let n = bars.len().max(1);
        let mut chart = ChartBuilder::on(area)
            .caption(name, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n as f64, 0f64..top)?;
        let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(2 * n + 1)
            .x_label_formatter(&|x| category(&labels, *x))
            .x_label_style(("sans-serif", 10))
            .y_desc(y_desc)
            .draw()?;
        for (k, (pname, colour)) in PHASES.iter().enumerate() {
            let rects = bars.iter().enumerate().map(|(i, b)| {
                let v = b.phases.values();
                let low: f64 = v[..k].iter().sum();
                Rectangle::new(
                    [(i as f64 + 0.15, low), (i as f64 + 0.85, low + v[k])],
                    colour.filled(),
                )
            });
            chart
                .draw_series(rects)?
                .label(*pname)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                });
        }
        legend(&mut chart)?;
    }
    written(&root, path)
}

/// The label of the category whose centre is at `x` (ticks elsewhere stay blank).
fn category(labels: &[String], x: f64) -> String {
    let i = x.floor();
    if (x - i - 0.5).abs() < 1e-6 && i >= 0.0 {
        labels.get(i as usize).cloned().unwrap_or_default()
    } else {
        String::new()
    }
}

/// Grouped bars: one group per category, one bar per series (policy), into `path`.
pub(crate) fn grouped_bars(
    categories: &[String],
    series: &[(&str, Vec<f64>)],
    title: &str,
    y_desc: &str,
    path: &Path,
) -> Result<()> {
    let n = categories.len().max(1);
    let root = SVGBackend::new(path, ((160 + 110 * n as u32).max(640), 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(2 * n + 1)
        .x_label_formatter(&|x| category(categories, *x))
        .y_desc(y_desc)
        .draw()?;
    let w = 0.8 / series.len().max(1) as f64;
    for (k, (name, values)) in series.iter().enumerate() {
        let colour = POLICY_COLOURS[k % POLICY_COLOURS.len()];
        let rects = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| {
                let x0 = i as f64 + 0.1 + k as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.95, v)], colour.filled())
            });
        chart
            .draw_series(rects)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    legend(&mut chart)?;
    written(&root, path)
}

/// Draws the legend of `chart`'s labelled series in its upper right corner.
fn legend<'a>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Writes the SVG of `root` out to `path`.
fn written(root: &DrawingArea<SVGBackend<'_>, Shift>, path: &Path) -> Result<()> {
    root.present()?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

/// `bench nvme`: IOPS per policy for every workload, depth and vCPU count (`nvme.svg`), and
/// the hypervisor's phases per I/O as stacked bars (`nvme-phases.svg`).
pub(crate) fn nvme(rows: &[crate::bench_nvme::Row], path: &Path) -> Result<()> {
    let mut cats: Vec<(String, u64, u64)> = Vec::new();
    for r in rows {
        let c = (r.workload.clone(), r.qd, r.vcpus);
        if !cats.contains(&c) {
            cats.push(c);
        }
    }
    let labels: Vec<String> = cats
        .iter()
        .map(|(w, qd, v)| format!("{w} qd{qd} {v}vCPU"))
        .collect();
    let series: Vec<(&str, Vec<f64>)> = crate::bench_nvme::POLICIES
        .iter()
        .map(|&p| {
            let v = cats
                .iter()
                .map(|c| {
                    rows.iter()
                        .find(|r| {
                            r.policy == p && r.workload == c.0 && r.qd == c.1 && r.vcpus == c.2
                        })
                        .map_or(f64::NAN, |r| r.iops)
                })
                .collect();
            (p, v)
        })
        .collect();
    grouped_bars(
        &labels,
        &series,
        "NVMe read IOPS per protection policy (QEMU TCG, emulated; cargo xtask bench nvme)",
        "IOPS (all vCPUs)",
        path,
    )?;
    let bars: Vec<PhaseBar<'_>> = rows
        .iter()
        .filter(|r| r.policy != "passthrough")
        .map(|r| PhaseBar {
            label: format!(
                "{} {}/{} {}v",
                r.policy,
                r.workload.replace("rand", "r").replace("seq", "s"),
                r.qd,
                r.vcpus
            ),
            phases: &r.phases,
        })
        .collect();
    phase_bars(
        &[("per I/O".to_string(), bars)],
        "Hypervisor cycles per NVMe I/O by phase (QEMU TCG; cargo xtask bench nvme)",
        "hypervisor cycles per I/O",
        &path.with_file_name("nvme-phases.svg"),
    )
}

/// `cargo xtask bench plot`: redraws every plot whose JSON exists in `target/bench`.
pub(crate) fn redraw() -> Result<()> {
    let dir = crate::root().join("target/bench");
    let mut drawn = 0;
    let dma_json = dir.join("dma.json");
    if dma_json.exists() {
        dma(&dma_json)?;
        drawn += 1;
    }
    let nvme_json = dir.join("nvme.json");
    if nvme_json.exists() {
        let rows: Vec<crate::bench_nvme::Row> =
            serde_json::from_str(&std::fs::read_to_string(&nvme_json)?)?;
        let mut rows = rows;
        // The phases are nested in the JSON (the guest's flat line fills them otherwise).
        let values: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&nvme_json)?)?;
        for (r, v) in rows.iter_mut().zip(values) {
            r.phases = serde_json::from_value(v["phases"].clone())?;
        }
        nvme(&rows, &nvme_json.with_extension("svg"))?;
        drawn += 1;
    }
    if drawn == 0 {
        return Err(
            "no target/bench/dma.json or nvme.json: run cargo xtask bench dma or nvme first".into(),
        );
    }
    Ok(())
}

/// A `bench dma` row as the plots read it from `dma.json` (extra fields are ignored).
#[derive(serde::Deserialize)]
struct DmaRow {
    policy: String,
    batch: u64,
    bytes: u64,
    phases: Phases,
}

/// `bench dma`: the hypervisor's phases per map+unmap as stacked bars per policy and batch
/// size, one panel per buffer size, read from `json` (`dma.json`) into `dma.svg` beside it.
/// Rows of several vCPU counts, if the file has them, each get their own bar.
pub(crate) fn dma(json: &Path) -> Result<()> {
    let text = std::fs::read_to_string(json)?;
    let values: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    let rows: Vec<(DmaRow, Option<u64>)> = values
        .into_iter()
        .map(|v| {
            let vcpus = v.get("vcpus").and_then(serde_json::Value::as_u64);
            serde_json::from_value(v).map(|r| (r, vcpus))
        })
        .collect::<std::result::Result<_, _>>()?;
    let multi = rows.iter().any(|r| r.1.is_some_and(|v| v > 1));
    let mut sizes: Vec<u64> = rows.iter().map(|r| r.0.bytes).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let panels: Vec<(String, Vec<PhaseBar<'_>>)> = sizes
        .iter()
        .map(|&b| {
            let bars = rows
                .iter()
                .filter(|r| r.0.bytes == b)
                .map(|(r, v)| PhaseBar {
                    label: match v {
                        Some(v) if multi => format!("{}@{} {v}v", r.policy, r.batch),
                        _ => format!("{}@{}", r.policy, r.batch),
                    },
                    phases: &r.phases,
                })
                .collect();
            (format!("{} KiB buffers", b >> 10), bars)
        })
        .collect();
    phase_bars(
        &panels,
        "Hypervisor cycles per map+unmap by phase, per policy@batch (QEMU TCG; cargo xtask bench dma)",
        "hypervisor cycles per map+unmap",
        &json.with_extension("svg"),
    )?;
    if multi {
        vcpu_scaling(&text, &json.with_file_name("dma-vcpus.svg"))?;
    }
    Ok(())
}

/// `bench dma --vcpus 1,2`: operations per second per policy@batch (4 KiB), one bar per vCPU
/// count, from the rows' `vcpus` and `ops_per_s` fields.
fn vcpu_scaling(json: &str, path: &Path) -> Result<()> {
    let values: Vec<serde_json::Value> = serde_json::from_str(json)?;
    let get = |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_f64);
    let rows: Vec<(String, u64, f64)> = values
        .iter()
        .filter(|v| get(v, "bytes") == Some(4096.0))
        .filter_map(|v| {
            let policy = v.get("policy")?.as_str()?;
            let label = format!("{policy}@{}", get(v, "batch")?);
            Some((label, get(v, "vcpus")? as u64, get(v, "ops_per_s")?))
        })
        .collect();
    let mut cats: Vec<String> = Vec::new();
    let mut counts: Vec<u64> = Vec::new();
    for (c, n, _) in &rows {
        if !cats.contains(c) {
            cats.push(c.clone());
        }
        if !counts.contains(n) {
            counts.push(*n);
        }
    }
    counts.sort_unstable();
    let names: Vec<String> = counts.iter().map(|n| format!("{n} vCPU(s)")).collect();
    let series: Vec<(&str, Vec<f64>)> = counts
        .iter()
        .zip(&names)
        .map(|(n, name)| {
            let v = cats
                .iter()
                .map(|c| {
                    rows.iter()
                        .find(|r| &r.0 == c && r.1 == *n)
                        .map_or(f64::NAN, |r| r.2)
                })
                .collect();
            (name.as_str(), v)
        })
        .collect();
    grouped_bars(
        &cats,
        &series,
        "PV DMA map+unmap operations per second by vCPUs of one guest, 4 KiB (QEMU TCG; cargo xtask bench dma --vcpus 1,2)",
        "operations per second (all vCPUs)",
        path,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn category_labels_only_at_centres() {
        let l = vec!["a".to_string(), "b".to_string()];
        assert_eq!(category(&l, 0.5), "a");
        assert_eq!(category(&l, 1.5), "b");
        assert_eq!(category(&l, 1.0), "");
        assert_eq!(category(&l, 2.5), "");
    }

    #[test]
    fn writes_svg_with_bars_and_labels() {
        let dir = std::env::temp_dir().join(format!("moat-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("g.svg");
        grouped_bars(
            &["rand4k qd1".into(), "rand4k qd32".into()],
            &[
                ("passthrough", vec![100.0, 200.0]),
                ("strict", vec![50.0, f64::NAN]),
            ],
            "t",
            "IOPS",
            &p,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("rand4k qd32") && svg.contains("strict"));
        // 3 finite bars plus the two legend swatches.
        assert!(svg.matches("<rect").count() >= 5);
        let ph = Phases {
            exit: 1.0,
            validate: 2.0,
            iova_alloc: 3.0,
            pte_write: 4.0,
            invalidate: 5.0,
            iova_free: 6.0,
        };
        let q = dir.join("p.svg");
        phase_bars(
            &[(
                "4 KiB".into(),
                vec![PhaseBar {
                    label: "strict@1".into(),
                    phases: &ph,
                }],
            )],
            "t",
            "cycles",
            &q,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&q).unwrap();
        assert!(svg.contains("strict@1") && svg.contains("PTE write"));
        let j = dir.join("dma.json");
        std::fs::write(
            &j,
            r#"[{"policy":"strict","batch":64,"bytes":4096,"ns_per_op":1.0,"phases":{"exit":1.0,"validate":2.0,"iova_alloc":3.0,"pte_write":4.0,"invalidate":5.0,"iova_free":6.0},"emulated":"QEMU TCG"}]"#,
        )
        .unwrap();
        dma(&j).unwrap();
        let svg = std::fs::read_to_string(dir.join("dma.svg")).unwrap();
        assert!(svg.contains("strict@64") && svg.contains("4 KiB buffers"));
        assert!(!dir.join("dma-vcpus.svg").exists());
        let row = |v: u64, ops: f64| {
            format!(
                r#"{{"policy":"batched","batch":64,"bytes":4096,"vcpus":{v},"ops_per_s":{ops},"phases":{{"exit":1.0,"validate":2.0,"iova_alloc":3.0,"pte_write":4.0,"invalidate":5.0,"iova_free":6.0}}}}"#
            )
        };
        std::fs::write(&j, format!("[{},{}]", row(1, 1000.0), row(2, 1700.0))).unwrap();
        dma(&j).unwrap();
        let svg = std::fs::read_to_string(dir.join("dma-vcpus.svg")).unwrap();
        assert!(svg.contains("batched@64") && svg.contains("2 vCPU(s)"));
        let svg = std::fs::read_to_string(dir.join("dma.svg")).unwrap();
        assert!(svg.contains("batched@64 2v"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
