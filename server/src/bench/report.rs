//! The self-contained HTML report: figures as a table and plots as inline SVG (plotters), with no
//! network fetches, so it opens anywhere.

use plotters::prelude::*;

use crate::bench::BenchReport;

const W: u32 = 720;
const H: u32 = 320;
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type Series = Vec<(String, Vec<(f64, f64)>)>;

/// One line chart as an SVG string.
fn chart(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &Series,
    y_floor_zero: bool,
) -> Result<String, String> {
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if y_floor_zero {
        y0 = y0.min(0.0);
    }
    let pad = ((y1 - y0) * 0.08).max(1e-3);
    let (y0, y1) = (
        y0 - if y_floor_zero && y0 >= 0.0 { 0.0 } else { pad },
        y1 + pad,
    );
    let x1 = if x1 <= x0 { x0 + 1.0 } else { x1 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut c = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| e.to_string())?;
        c.configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        if series.len() > 1 {
            c.configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The whole page.
pub fn html(r: &BenchReport) -> Result<String, String> {
    // Latency CDFs: every returned frame's (stamped video), every returned click's (audio; the
    // only timing of avatar sessions, whose frames carry no stamp).
    let cdf = |mut v: Vec<f64>| -> Vec<(f64, f64)> {
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        v.iter()
            .enumerate()
            .map(|(i, l)| (*l, (i + 1) as f64 / n))
            .collect()
    };
    let frames = cdf(r
        .per_session
        .iter()
        .flat_map(|s| s.frames.iter().map(|(_, l)| *l))
        .collect());
    let clicks = cdf(r
        .per_session
        .iter()
        .flat_map(|s| s.audio_latency_ms.iter().map(|(_, l)| *l))
        .collect());
    let series: Series = [("video frames", frames), ("audio clicks", clicks)]
        .into_iter()
        .filter(|(_, c)| !c.is_empty())
        .map(|(name, c)| (name.to_string(), c))
        .collect();
    let cdf_svg = chart(
        "Glass-to-glass latency, all sessions (CDF)",
        "latency (ms)",
        "fraction",
        &series,
        true,
    )?;

    let tl = &r.server.timeline;
    let per_session = r.overall.sessions.max(1) as f64;
    let fps_svg = chart(
        "Frames per second over time (server output, per session) and late frames",
        "time (s)",
        "frames / s",
        &vec![
            (
                "fps per session".into(),
                tl.iter()
                    .map(|(t, out, _)| (*t, out / per_session))
                    .collect(),
            ),
            (
                "late frames / s (all sessions)".into(),
                tl.iter().map(|(t, _, late)| (*t, *late)).collect(),
            ),
        ],
        true,
    )?;

    // The renderers' load (lip-sync only): what share of the GPU the frames take at full
    // batching, against the line where it runs out.
    let load_svg = if r.server.gpu_load.is_empty() {
        String::new()
    } else {
        let (first, last) = (
            r.server.gpu_load.first().map_or(0.0, |p| p.0),
            r.server.gpu_load.last().map_or(0.0, |p| p.0),
        );
        let svg = chart(
            "GPU load: the share of the GPU the frames take in its cheapest batches",
            "time (s)",
            "load",
            &vec![
                ("highest renderer".into(), r.server.gpu_load.clone()),
                ("capacity".into(), vec![(first, 1.0), (last, 1.0)]),
            ],
            true,
        )?;
        format!("<h2>GPU load</h2>{svg}")
    };

    let av: Series = r
        .per_session
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.av_offset_ms.is_empty())
        .take(PALETTE.len())
        .map(|(i, s)| {
            (
                format!("session {}", i + 1),
                s.av_offset_ms
                    .iter()
                    .map(|(t, o)| (t / 1000.0, *o))
                    .collect(),
            )
        })
        .collect();
    let av_svg = chart(
        "A/V offset over time (returned audio minus returned video)",
        "time (s)",
        "offset (ms)",
        &av,
        false,
    )?;

    let json = serde_json::to_string_pretty(&r.overall).map_err(|e| e.to_string())?;
    let ramp = if r.ramp.is_empty() {
        String::new()
    } else {
        let rows: String = r
            .ramp
            .iter()
            .map(|s| {
                format!(
                    "<tr><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{}</td></tr>",
                    s.sessions,
                    s.p95_ms.map_or("-".into(), |p| format!("{p:.1}")),
                    s.late_pct,
                    s.loss_pct,
                    s.failed_sessions,
                    if s.sustainable { "yes" } else { "no" }
                )
            })
            .collect();
        format!(
            "<h2>Ramp</h2><p>Sustainable: <b>{}</b> sessions.</p><table><tr><th>sessions</th><th>p95 ms</th><th>late %</th><th>lost %</th><th>failed</th><th>within budget</th></tr>{rows}</table>",
            r.sustainable_sessions.map_or("none".into(), |n| n.to_string())
        )
    };
    Ok(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lipstream bench sessions</title>
<style>body{{font-family:system-ui,sans-serif;max-width:800px;margin:1rem auto;color:#222}}
pre{{background:#f4f4f4;padding:.6rem;overflow:auto;white-space:pre-wrap}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.2rem .5rem}}</style>
</head><body>
<h1>lipstream bench sessions</h1>
<p>{} · {} · {} mode · {} · {:.0} s per load</p>
<h2>Summary</h2><pre id="summary">{}</pre>
{ramp}
<h2>Latency</h2>{cdf_svg}
<h2>Throughput</h2>{fps_svg}
{load_svg}
<h2>A/V offset</h2>{av_svg}
<h2>Overall figures</h2><pre id="figures">{}</pre>
</body></html>
"#,
        esc(&r.date),
        esc(&r.url),
        match r.mode {
            crate::bench::Mode::Camera => "camera",
            crate::bench::Mode::Avatar => "avatar",
        },
        esc(&r.video),
        r.duration_s,
        esc(&crate::bench::summary(r)),
        esc(&json),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Mode, Overall, ServerFigures};

    fn report(gpu_load: Vec<(f64, f64)>) -> BenchReport {
        BenchReport {
            tool: "test".into(),
            date: "2026-12-07T00:00:00Z".into(),
            url: "http://127.0.0.1:8080".into(),
            mode: Mode::Avatar,
            duration_s: 3.0,
            video: "avatar".into(),
            overall: Overall {
                sessions: 1,
                ..Overall::default()
            },
            server: ServerFigures {
                timeline: vec![(1.0, 25.0, 0.0), (2.0, 25.0, 1.0)],
                gpu_load,
                ..ServerFigures::default()
            },
            per_session: Vec::new(),
            ramp: Vec::new(),
            sustainable_sessions: None,
        }
    }

    #[test]
    fn the_gpu_load_is_charted_when_the_run_measured_one() {
        let with = html(&report(vec![(1.0, 0.98), (2.0, 1.03)])).unwrap();
        assert!(with.contains("<h2>GPU load</h2>"));
        assert!(with.contains("capacity"));
        let without = html(&report(Vec::new())).unwrap();
        assert!(!without.contains("<h2>GPU load</h2>"));
    }
}
