//! `GET /status` (HTML) and `GET /status.json`. The page is rendered here, with its style
//! inline and its chart as inline SVG: no script, no font or stylesheet from elsewhere.

use std::fmt::Write;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{human_bytes, human_duration, Status};
use crate::api::{AppState, RouteKind};

pub async fn json(State(app): State<AppState>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let mut resp = match super::gate(&app, &parts).await {
        Err(e) => e.into_response(),
        Ok(()) => {
            let body = serde_json::to_string_pretty(&Status::of(&app)).expect("the status serialises");
            ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body).into_response()
        }
    };
    resp.extensions_mut().insert(RouteKind("status"));
    resp
}

pub async fn html(State(app): State<AppState>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let mut resp = match super::gate(&app, &parts).await {
        Err(e) => e.into_response(),
        Ok(()) => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
            render(&Status::of(&app)),
        )
            .into_response(),
    };
    resp.extensions_mut().insert(RouteKind("status"));
    resp
}

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn pct(r: Option<f64>) -> String {
    r.map_or("–".to_string(), |r| format!("{:.1}%", r * 100.0))
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#1d232a;background:#f7f8fa}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.4em 0 .4em;color:#2c4a6b}\
.sub{color:#5b6670;margin-bottom:1em}.grid{display:flex;flex-wrap:wrap;gap:1em}\
.card{background:#fff;border:1px solid #d9dee3;border-radius:6px;padding:.7em 1em;min-width:14em}\
.big{font-size:1.6em;font-weight:600}table{border-collapse:collapse;background:#fff}\
td,th{border:1px solid #d9dee3;padding:.3em .6em;text-align:left;font-size:.92em}th{background:#eef1f4}\
.ok{color:#1a7f37;font-weight:600}.bad{color:#c62828;font-weight:600}.unk{color:#8a6d00;font-weight:600}\
.bar{background:#e4e8ec;height:.8em;border-radius:3px;width:22em;position:relative;overflow:hidden}\
.bar span{display:block;height:100%;background:#3b7dd8}code{font-size:.9em}";

/// The page. Every value from outside (names, errors) is escaped.
pub fn render(s: &Status) -> String {
    let mut h = String::with_capacity(16 << 10);
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Stevedore status</title>\
         <style>{STYLE}</style></head><body><h1>Stevedore {}</h1><div class=\"sub\" id=\"summary\">replica \
         <code>{}</code> · up {} · store <b id=\"backend\">{}</b>{}</div>",
        esc(s.version),
        esc(&s.replica),
        human_duration(Duration::from_secs(s.uptime_seconds)),
        s.store.backend,
        if s.offline { " · <b class=\"bad\">offline</b> (no upstream is contacted)" } else { "" },
    );

    // The cache.
    let c = &s.cache;
    let _ = write!(
        h,
        "<h2>Cache</h2><div class=\"grid\">\
         <div class=\"card\">Hits <div class=\"big\" id=\"hits\">{}</div></div>\
         <div class=\"card\">Misses <div class=\"big\" id=\"misses\">{}</div></div>\
         <div class=\"card\">Hit ratio <div class=\"big\" id=\"hit-ratio\">{}</div>last hour: <span id=\"hit-ratio-1h\">{}</span></div>\
         <div class=\"card\">Served from cache <div class=\"big\" id=\"bytes-from-cache\">{}</div>last hour: {}</div>\
         <div class=\"card\">Fetched upstream <div class=\"big\" id=\"bytes-from-upstream\">{}</div>last hour: {}</div></div>",
        c.hits,
        c.misses,
        pct(c.hit_ratio),
        pct(c.hit_ratio_1h),
        human_bytes(c.bytes_from_cache),
        human_bytes(c.bytes_from_cache_1h),
        human_bytes(c.bytes_from_upstream),
        human_bytes(c.bytes_from_upstream_1h),
    );
    h.push_str(&chart(s));

    // The store.
    let u = &s.store.used_bytes;
    let used = u.proxied + u.pushed + u.imported;
    let _ = write!(
        h,
        "<h2>Store</h2><table id=\"store\"><tr><th>Used</th><td id=\"used-bytes\">{}</td></tr>\
         <tr><th>Proxied</th><td id=\"used-proxied\">{}</td></tr><tr><th>Pushed</th><td id=\"used-pushed\">{}</td></tr>\
         <tr><th>Imported</th><td id=\"used-imported\">{}</td></tr>\
         <tr><th>Uploads and fills in progress</th><td id=\"used-ingest\">{}</td></tr>",
        human_bytes(used),
        human_bytes(u.proxied),
        human_bytes(u.pushed),
        human_bytes(u.imported),
        human_bytes(u.ingest),
    );
    match (s.store.max_size, s.store.high_watermark, s.store.low_watermark) {
        (Some(max), Some(high), Some(low)) => {
            let counted = u.proxied + u.ingest;
            let fill = (counted as f64 / max.max(1) as f64 * 100.0).min(100.0);
            let _ = write!(
                h,
                "<tr><th>Cap (proxied + in progress)</th><td>{} of {} (high watermark {}, low {})\
                 <div class=\"bar\"><span style=\"width:{fill:.1}%\"></span></div></td></tr>",
                human_bytes(counted),
                human_bytes(max),
                human_bytes(high),
                human_bytes(low)
            );
        }
        _ => h.push_str("<tr><th>Cap</th><td>none (cache.max_size unset)</td></tr>"),
    }
    if !s.store.measured {
        h.push_str("<tr><th>Note</th><td>no usage check yet: proxied bytes are those filled since the start</td></tr>");
    }
    h.push_str("</table>");

    // The upstreams.
    h.push_str(
        "<h2>Upstreams</h2><table id=\"upstreams\"><tr><th>Host</th><th>State</th><th>Last request</th>\
         <th>Last error</th><th>Rate limit remaining</th><th>Cached tokens</th></tr>",
    );
    for up in &s.upstreams {
        let state = match up.reachable {
            Some(true) => "<span class=\"ok\">reachable</span>",
            Some(false) => "<span class=\"bad\">unreachable</span>",
            None => "<span class=\"unk\">not contacted yet</span>",
        };
        let tokens = if up.tokens.is_empty() {
            "none".to_string()
        } else {
            up.tokens
                .iter()
                .map(|t| {
                    format!(
                        "<code>{}</code> ({} left)",
                        esc(&t.scope),
                        human_duration(Duration::from_secs(t.expires_in_seconds))
                    )
                })
                .collect::<Vec<_>>()
                .join("<br>")
        };
        let _ = write!(
            h,
            "<tr class=\"upstream\" data-host=\"{host}\"><td>{host}</td><td>{state}</td><td>{}</td><td>{}</td><td>{}</td><td>{tokens}</td></tr>",
            up.last_request_age_seconds.map_or("–".into(), |a| format!("{} ago", human_duration(Duration::from_secs(a)))),
            up.last_error.as_deref().map_or("–".into(), esc),
            up.ratelimit_remaining.map_or("–".into(), |n| n.to_string()),
            host = esc(&up.host),
        );
    }
    h.push_str("</table>");

    // Fills in flight.
    h.push_str("<h2>Fills in flight</h2>");
    if s.fills.is_empty() {
        h.push_str("<p id=\"fills\">none</p>");
    } else {
        h.push_str(
            "<table id=\"fills\"><tr><th>Digest</th><th>Repository</th><th>Received</th><th>Followers</th></tr>",
        );
        for f in &s.fills {
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&f.digest),
                esc(&f.repository),
                human_bytes(f.bytes),
                f.followers
            );
        }
        h.push_str("</table>");
    }

    // Lifecycle and replicas.
    let ago = |t: Option<u64>| {
        t.map_or("never (since the start)".to_string(), |t| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            format!("{} ago", human_duration(Duration::from_secs(now.saturating_sub(t))))
        })
    };
    let l = &s.lifecycle;
    let _ = write!(
        h,
        "<h2>Lifecycle</h2><table id=\"lifecycle\"><tr><th>Last usage check</th><td>{}</td></tr>\
         <tr><th>Evicted since the start</th><td>{}</td></tr><tr><th>Last GC</th><td>{}</td></tr>\
         <tr><th>GC reclaimed since the start</th><td>{}</td></tr></table>",
        ago(l.last_run),
        human_bytes(l.evicted_bytes),
        ago(l.gc_last_run),
        human_bytes(l.gc_reclaimed_bytes)
    );
    h.push_str("<h2>Replicas</h2><table id=\"replicas\"><tr><th>Replica</th><th>Heartbeat age</th></tr>");
    for r in &s.replicas {
        let _ = write!(
            h,
            "<tr><td><code>{}</code>{}</td><td>{}</td></tr>",
            esc(&r.id),
            if r.this { " (this one)" } else { "" },
            human_duration(Duration::from_secs(r.heartbeat_age_seconds))
        );
    }
    h.push_str("</table>");

    h.push_str("<h2>Most pulled repositories</h2>");
    if s.top_repositories.is_empty() {
        h.push_str("<p id=\"top-repositories\">none yet</p>");
    } else {
        h.push_str("<table id=\"top-repositories\"><tr><th>Repository</th><th>Manifest pulls</th></tr>");
        for r in &s.top_repositories {
            let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(&r.name), r.pulls);
        }
        h.push_str("</table>");
    }
    h.push_str("<p class=\"sub\">Rendered from memory; the same data: <a href=\"/status.json\">/status.json</a>.</p></body></html>");
    h
}

/// Hits (blue) and misses (orange) per minute over the last hour, stacked bars.
fn chart(s: &Status) -> String {
    let (w, ht, pad) = (600.0, 120.0, 20.0);
    let max = s.last_hour.iter().map(|m| m.hits + m.misses).max().unwrap_or(0).max(1) as f64;
    let n = s.last_hour.len().max(1) as f64;
    let bw = (w - 2.0 * pad) / n;
    let mut svg = format!(
        "<h2>Hits and misses, last hour</h2><svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" \
         height=\"{}\" role=\"img\" aria-label=\"hits and misses per minute over the last hour\">\
         <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{}\" fill=\"#fff\" stroke=\"#d9dee3\"/>",
        ht + 30.0,
        ht + 30.0
    );
    for (i, m) in s.last_hour.iter().enumerate() {
        let x = pad + i as f64 * bw;
        let hh = m.hits as f64 / max * ht;
        let mh = m.misses as f64 / max * ht;
        let base = pad + ht - 10.0;
        if m.hits > 0 {
            let _ = write!(
                svg,
                "<rect class=\"hit\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{hh:.1}\" fill=\"#3b7dd8\"/>",
                base - hh,
                bw * 0.8
            );
        }
        if m.misses > 0 {
            let _ = write!(
                svg,
                "<rect class=\"miss\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{mh:.1}\" fill=\"#e8833a\"/>",
                base - hh - mh,
                bw * 0.8
            );
        }
    }
    let _ = write!(
        svg,
        "<text x=\"{pad}\" y=\"{}\" font-size=\"11\" fill=\"#5b6670\">60 min ago</text>\
         <text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#5b6670\" text-anchor=\"end\">now · max {} / min · \
         <tspan fill=\"#3b7dd8\">■ hits</tspan> <tspan fill=\"#e8833a\">■ misses</tspan></text></svg>",
        ht + 25.0,
        w - pad,
        ht + 25.0,
        max as u64
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }
}
