"""The Releases page, rendered on the server from the calendar and the history (the same data as the JSON endpoints).

Times are written in UTC into ``<time datetime=...>`` elements; a few lines of script rewrite them in the viewer's
time zone with the browser's Intl API (without script, UTC stays readable). Everything shown is escaped: reasons and
user names are text someone typed.
"""

from __future__ import annotations

import re
from html import escape
from typing import Any

from omnisphere_release.migrations.engine import version_label
from omnisphere_release.ui.history import run_path

OUTCOME_CLASS = {"released": "ok", "rolled_back": "bad", "rollback_incomplete": "worst", "failed": "bad",
                 "refused": "muted", "dry_run": "muted", "in_progress": "muted",
                 # ended at approval: nothing was changed
                 "rejected": "muted", "approval_timed_out": "muted", "no_approver": "muted"}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1f2937; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 2rem; } h3 { font-size: 1rem; margin-top: 1.5rem; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { text-align: left; padding: 0.3rem 0.6rem; border-bottom: 1px solid #e5e7eb; vertical-align: top; }
th { background: #f3f4f6; }
.ok { color: #047857; font-weight: 600; } .bad { color: #b91c1c; font-weight: 600; }
.worst { color: #fff; background: #b91c1c; font-weight: 700; padding: 0 0.3rem; } .muted { color: #6b7280; }
.scope-release_all { background: #eef2ff; } .tz { color: #6b7280; font-size: 0.85rem; }
code { font-size: 0.85rem; }
.chart { max-width: 100%; height: auto; border: 1px solid #e5e7eb; margin-top: 0.4rem; }
.strip span { display: inline-block; width: 0.8rem; text-align: center; }
.attention { background: #fef2f2; }
details > summary { cursor: pointer; }
"""

# Rewrites every <time> in the viewer's zone; the zone's name is shown once at the top.
SCRIPT = """
(function () {
  var fmt = new Intl.DateTimeFormat(undefined, {weekday: "short", year: "numeric", month: "short", day: "numeric",
                                                hour: "2-digit", minute: "2-digit", timeZoneName: "short"});
  document.querySelectorAll("time[datetime]").forEach(function (el) {
    var when = new Date(el.getAttribute("datetime"));
    if (!isNaN(when)) { el.textContent = fmt.format(when); }
  });
  var zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  document.querySelectorAll(".viewer-tz").forEach(function (el) { el.textContent = zone; });
  // Charts are drawn on the server: ask for them in the viewer's zone (a folded chart loads when it is opened).
  document.querySelectorAll("img[data-chart]").forEach(function (el) {
    el.src = el.getAttribute("data-chart") + "&tz=" + encodeURIComponent(zone);
  });
  document.querySelectorAll("a.toggle-chart").forEach(function (link) {
    link.addEventListener("click", function (event) {
      var row = link.closest("tr").nextElementSibling;
      if (row && row.classList.contains("chart-row")) { event.preventDefault(); row.hidden = !row.hidden; }
    });
  });
})();
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value))


def _time(iso: str | None) -> str:
    return f'<time datetime="{_e(iso)}">{_e(iso)}</time>' if iso else ""


def _link(href: str | None, text: str, top: bool = True) -> str:
    """Links into Airflow's own pages leave the plugin's frame (``top``); links to this app's pages stay in it."""
    target = ' target="_top"' if top else ""
    return f'<a href="{_e(href)}"{target}>{_e(text)}</a>' if href else ""


def _who(r: dict[str, Any]) -> str:
    approved = ""
    if r.get("approved_by"):
        approved = f"<br>approved by {_e(r['approved_by'])}"
        if r.get("approved_at"):
            approved += f" <span class=muted>{_time(r['approved_at'])}</span>"
    if r.get("rejected_by"):
        approved += f"<br><span class=bad>rejected by {_e(r['rejected_by'])}</span>"
        if r.get("rejected_at"):
            approved += f" <span class=muted>{_time(r['rejected_at'])}</span>"
    reason = f"<br><span class=muted>{_e(r['reason'])}</span>" if r.get("reason") else ""
    return f"{_e(r['triggered_by'] or 'unknown')}{approved}{reason}"


def _pct(rate: Any) -> str:
    return f"{rate * 100:.2f} %" if isinstance(rate, (int, float)) else "n/a"


def _bake_text(bake: dict[str, Any]) -> str:
    """One line: the verdict, and for a failure when and why; else the worst minute against the thresholds."""
    thresholds = bake.get("thresholds") or {}
    if bake.get("verdict") == "failed":
        when = f" at {_time(bake['failed_at'])}" if bake.get("failed_at") else ""
        return f'<span class=bad>failed{when}</span>: {_e(bake.get("reason") or "no reason recorded")}'
    return (f"<span class=ok>{_e(bake.get('verdict') or 'unknown')}</span> · {bake['minutes']} min · worst 5xx "
            f"{_pct(bake.get('max_error_rate'))} (max {_pct(thresholds.get('max_error_rate'))}), worst p99 "
            f"{_e(_num(bake.get('max_p99_ms')))} ms (max {_e(thresholds.get('max_p99_latency_ms'))} ms)")


def _num(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) else "n/a"


def _chart(src: str, alt: str, lazy: bool) -> str:
    """The server-drawn chart; the page's script adds the viewer's time zone to its address (UTC without script)."""
    loading = ' loading="lazy"' if lazy else ""
    return (f'<img class=chart data-chart="{_e(src)}" alt="{_e(alt)}"{loading}>'
            f'<noscript><img class=chart src="{_e(src)}" alt="{_e(alt)}"></noscript>')


def _bake_cell(r: dict[str, Any]) -> str:
    bake = r.get("bake")
    if not bake:
        return "<span class=muted>" + ("not yet" if r["outcome"] == "in_progress" else "no bake recorded") + "</span>"
    # Without script the link opens the release's page, chart included; with it, the chart opens below the row.
    return f'{_bake_text(bake)}<br><a class=toggle-chart href="{_e(r["links"]["detail"])}">chart</a>'


def _chart_row(r: dict[str, Any], columns: int) -> str:
    """The release's bake chart, the table's whole width, under its row: hidden until its "chart" link is used."""
    if not r.get("bake"):
        return ""
    return (f"<tr class=chart-row hidden><td colspan={columns}>"
            f"{_chart(r['links']['bake_chart'], 'bake of ' + r['run_id'], lazy=True)}</td></tr>")


def _release_line(release: dict[str, Any]) -> str:
    reason = f" — {_e(release['reason'])}" if release.get("reason") else ""
    forced = f" (forced: {_e(release['force_reason'])})" if release.get("force_reason") else ""
    return (f"<li><b>{_e(release['service'])}</b> <code>{_e(release.get('image_tag'))}</code> by "
            f"{_e(release.get('triggered_by') or 'unknown')}{reason}{forced} "
            f"<span class=muted>({_e(release['run_id'])})</span></li>")


def _manifest_line(queued: dict[str, Any]) -> str:
    services = ", ".join(f"{_e(s)} <code>{_e(tag)}</code>" for s, tag in sorted(queued["manifest"].items()))
    reason = f" — {_e(queued['reason'])}" if queued.get("reason") else ""
    environment = f" (to {_e(queued['environment'])})" if queued.get("environment") else ""
    return (f"<li>queued manifest{environment}: {services}, by {_e(queued.get('queued_by') or 'unknown')}{reason}"
            "</li>")


def _window_row(window: dict[str, Any]) -> str:
    what = [_release_line(r) for r in window["releases"]]
    if window.get("manifest"):
        what.append(_manifest_line(window["manifest"]))
    return (f'<tr class="scope-{_e(window["scope"])}"><td>{_time(window["start"])}</td>'
            f'<td>{_time(window["end"])}</td><td>{_e(window["scope"])}</td>'
            f'<td class=muted>{_e(window["summary"])}</td>'
            f'<td>{"<ul>" + "".join(what) + "</ul>" if what else "<span class=muted>nothing queued</span>"}'
            f"</td></tr>")


CALENDAR_HEAD = ("<table><thead><tr><th>opens</th><th>closes</th><th>for</th><th>window</th><th>will run</th></tr>"
                 "</thead><tbody>")


def _calendar(calendar: dict[str, Any]) -> str:
    """The windows where something will run and the next window of each service come first; the others, where
    nothing is queued yet, are folded away (a daily window would otherwise push everything else off the screen)."""
    first, shown, folded = set(), [], []
    for window in calendar["windows"]:
        if window["releases"] or window.get("manifest") or window["scope"] not in first:
            shown.append(_window_row(window))
        else:
            folded.append(_window_row(window))
        first.add(window["scope"])
    elsewhere = []
    for item in calendar["elsewhere"]:
        if item["kind"] == "release":
            elsewhere.append(f"<li>{_time(item.get('window_start')) or 'start unknown'}: "
                             f"{_release_line(item).removeprefix('<li>')}")
        else:
            elsewhere.append(f"<li>{_time(item['window_start'])}: {_manifest_line(item).removeprefix('<li>')}")
    if not shown:
        return "<p class=muted>No windows.</p>"
    table = CALENDAR_HEAD + "".join(shown) + "</tbody></table>"
    if folded:
        table += (f"<details><summary>{len(folded)} more windows with nothing queued yet</summary>{CALENDAR_HEAD}"
                  + "".join(folded) + "</tbody></table></details>")
    more = ("<h3>Waiting outside these windows</h3><ul>" + "".join(elsewhere) + "</ul>") if elsewhere else ""
    return table + more


def _image(image: str | None) -> str:
    """Show ``name:tag`` (the registry host and path are the same on every line); the whole reference on hover."""
    if not image:
        return "<span class=muted>unknown</span>"
    short = image.rsplit("/", 1)[-1]
    name, at, digest = short.partition("@")
    if at:  # deployed by digest: its first 12 hex digits tell two images apart
        short = f"{name}@{digest.removeprefix('sha256:')[:12]}…"
    return f'<code title="{_e(image)}">{_e(short)}</code>'


def _duration(seconds: float | None, slowest: dict[str, Any]) -> str:
    text = f"{seconds:.0f} s" if seconds is not None else ""
    if slowest:
        text += f"<br><span class=muted>slowest: {_e(slowest['stage'])} {_e(slowest['seconds'])} s</span>"
    return text


def _history(service: str, releases: list[dict[str, Any]]) -> str:
    title = (f'<h3>{_e(service)} <span class=tz><a href="schema?service={_e(service)}">schema history</a></span>'
             "</h3>")
    if not releases:
        return f"{title}<p class=muted>No release runs yet.</p>"
    rows = []
    for r in releases:
        digest = f"<br><code class=muted>{_e(r['target']['image_digest'])}</code>" if r["target"].get(
            "image_digest") else ""
        slowest = r.get("slowest_stage") or {}
        links = " · ".join(x for x in (_link(r["links"]["detail"], "details", top=False),
                                       _link(r["links"]["run"], "run"), _link(r["links"]["report"], "report"),
                                       _link(r["links"]["failed_task_log"], f"log of {r['failed_task']}")) if x)
        rows.append(
            f"<tr><td>{_time(r['started']) or '<span class=muted>not started</span>'}</td>"
            f"<td>{_image(r['before']['image'])} →<br>{_image(r['target']['image'])}{digest}</td>"
            f'<td class="{OUTCOME_CLASS.get(r["outcome"], "")}">{_e(r["outcome_text"])}</td>'
            f"<td>{_duration(r['duration_seconds'], slowest)}</td>"
            f"<td>{_who(r)}</td>"
            f"<td>{_bake_cell(r)}</td>"
            f"<td>{links}</td></tr>{_chart_row(r, 7)}")
    return (f"{title}<table><thead><tr><th>started</th><th>before → target</th><th>outcome</th>"
            "<th>duration</th><th>who</th><th>bake</th><th>links</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)} · OmniSphere</title>"
            f"<style>{STYLE}</style></head><body>{body}<script>{SCRIPT}</script></body></html>")


# How the release stages sign what they apply: "dag=<dag_id> run=<run_id>" (operators/migrations.py, preflight.py).
_RUN_SIGNATURE = re.compile(r"^dag=(\S+) run=(\S+)")


def _by(signature: str) -> str:
    """Link a migration's author to its run when it was a DAG run (relative: this page is served at /omnisphere/)."""
    match = _RUN_SIGNATURE.match(signature or "")
    if not match:
        return _e(signature)
    return _link(f"..{run_path(match.group(1), match.group(2))}", signature)


def render_schema_page(schema: dict[str, Any]) -> str:
    problems = [f'<li class=worst>DIRTY {_e(d["version"])}_{_e(d["name"])} ({_e(d["direction"])}): '
                f'{_e(d["error"] or "interrupted")} — by {_e(d["applied_by"])}</li>' for d in schema["dirty"]]
    problems += [f"<li class=bad>DRIFT {_e(d)}</li>" for d in schema["drift"]]
    applied = "".join(f"<tr><td>{_e(a['version'])}</td><td>{_e(a['name'])}</td><td>{_time(a['applied_at'])}</td>"
                      f"<td>{_by(a['applied_by'])}</td></tr>" for a in reversed(schema["applied"]))
    log = "".join(f"<tr><td>{_time(e['at'])}</td><td>{_e(e['version'])}_{_e(e['name'])}</td>"
                  f"<td>{_e(e['action'])}</td><td>{_by(e['by'])}</td><td>{_e(e['reason'])}</td>"
                  f"<td>{_e(e['execution_ms'])}</td></tr>" for e in schema["log"])
    return _page(f"Schema of {schema['service']}", (
        f"<h1>Schema of {_e(schema['service'])}</h1><p><a href=releases>← Releases</a></p>"
        f"<p>Version <b>{_e(schema['current_version'])}</b>; {len(schema['applied'])} applied, "
        f"{len(schema['pending'])} pending ({_e(', '.join(schema['pending'])) or 'none'})"
        f"{'; baseline ' + _e(schema['baseline']) if schema.get('baseline') is not None else ''}. "
        f"<span class=tz>Times in <span class=viewer-tz>UTC</span>.</span></p>"
        + (f"<ul>{''.join(problems)}</ul>" if problems else "<p class=ok>No dirty version, no drift.</p>")
        + "<h2>Applied versions</h2><table><thead><tr><th>version</th><th>name</th><th>applied</th><th>by</th>"
        f"</tr></thead><tbody>{applied}</tbody></table>"
        "<h2>Audit log (newest first)</h2><table><thead><tr><th>at</th><th>migration</th><th>action</th><th>by</th>"
        f"<th>reason</th><th>ms</th></tr></thead><tbody>{log}</tbody></table>"))


OUTCOME_MARK = {"released": "✓", "rolled_back": "✗", "failed": "✗", "rollback_incomplete": "‼"}


def _overview(overview: dict[str, Any]) -> str:
    """Services at a glance: what runs, how the last releases went, the next window and what waits for it."""
    rows = []
    for line in overview["services"]:
        running = line["running"] or {}
        last = line["last_release"]
        strip = "".join(f'<span class="{OUTCOME_CLASS.get(o, "")}" title="{_e(o)}">{OUTCOME_MARK.get(o, "?")}</span>'
                        for o in line["recent_outcomes"])
        last_text = (f'<a href="{_e(last["detail"])}" class="{OUTCOME_CLASS.get(last["outcome"], "")}">'
                     f'{_e(last["outcome"].replace("_", " "))}</a> {_time(last["started"])}' if last
                     else "<span class=muted>none yet</span>")
        window = line["next_window"]
        waiting = "".join(f"<li><code>{_e(w.get('image_tag'))}</code> by {_e(w.get('triggered_by') or 'unknown')}"
                          f"{' (forced)' if w.get('mode') == 'forced' else ''}</li>" for w in line["waiting"])
        busy = f"<br><span class=muted>in progress: {_e(', '.join(line['in_progress']))}</span>" if line[
            "in_progress"] else ""
        attention = " class=attention" if line["needs_attention"] else ""
        rows.append(
            f"<tr{attention}><td><b>{_e(line['service'])}</b>"
            f"{'<br><span class=worst>rollback incomplete: act first</span>' if line['needs_attention'] else ''}</td>"
            f"<td>{_image(running.get('image'))}<br><span class=muted>schema "
            f"{_e(version_label(running.get('schema_version')) if running else 'unknown')}</span></td>"
            f"<td>{last_text}{busy}</td><td class=strip>{strip or '<span class=muted>—</span>'}</td>"
            f"<td>{_time(window['start']) if window else '<span class=muted>none in range</span>'}"
            f"{'<br><span class=muted>' + _e(window['summary']) + '</span>' if window else ''}</td>"
            f"<td>{'<ul>' + waiting + '</ul>' if waiting else '<span class=muted>nothing waiting</span>'}</td></tr>")
    train = overview.get("release_all")
    train_text = ""
    if train and train["next_window"]:
        queued = train["next_queued"]
        what = (", ".join(f"{_e(s)} <code>{_e(t)}</code>" for s, t in sorted(queued["manifest"].items()))
                + f" by {_e(queued.get('queued_by') or 'unknown')}" if queued else "nothing queued yet")
        train_text = (f"<p><b>release_all</b> next window {_time(train['next_window']['start'])} "
                      f"<span class=muted>({_e(train['next_window']['summary'])})</span>: {what}</p>")
    if not rows:
        return train_text
    return (train_text + "<table><thead><tr><th>service</th><th>running now</th><th>last release</th>"
            "<th title='the last releases, oldest first'>recent</th><th>next window</th><th>waiting for it</th>"
            "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def render_page(calendar: dict[str, Any], history: dict[str, list[dict[str, Any]]],
                overview: dict[str, Any]) -> str:
    services = "".join(_history(s, releases) for s, releases in history.items()) or (
        "<p class=muted>You may read no release DAG.</p>")
    return _page("Releases", (
        "<h1>Releases</h1>"
        f"<p class=tz>Times in <span class=viewer-tz>UTC</span>; generated {_time(calendar['generated_at'])}. "
        "The same data as JSON: <a href=api/overview>overview</a> · <a href=api/calendar>calendar</a> · "
        "<a href=api/releases>releases</a>.</p>"
        f"<h2>Services at a glance</h2>{_overview(overview)}"
        f"<h2>Calendar: windows until {_time(calendar['until'])}</h2>{_calendar(calendar)}"
        f"<h2>History</h2>{services}"))


def render_release_page(service: str, release: dict[str, Any], bake: dict[str, Any] | None,
                        problem: str | None) -> str:
    """One release: its history line, who approved, its bake chart and the minutes behind it, its canary steps."""
    r = release
    links = " · ".join(x for x in (_link(r["links"]["run"], "run in Airflow"), _link(r["links"]["report"], "report"),
                                   _link(r["links"]["bake"], "bake as JSON", top=False),
                                   _link(r["links"]["failed_task_log"], f"log of {r['failed_task']}")) if x)
    head = (f"<h1>{_e(service)}: {_e(r['run_id'])}</h1><p><a href=releases>← Releases</a> · {links}</p>"
            f'<p class="{OUTCOME_CLASS.get(r["outcome"], "")}">{_e(r["outcome_text"])}</p>'
            f"<table><tbody><tr><th>before → target</th><td>{_image(r['before']['image'])} → "
            f"{_image(r['target']['image'])} <code class=muted>{_e(r['target'].get('image_digest'))}</code></td></tr>"
            f"<tr><th>started</th><td>{_time(r['started'])}</td></tr>"
            f"<tr><th>duration</th><td>{_duration(r['duration_seconds'], r.get('slowest_stage') or {})}</td></tr>"
            f"<tr><th>who</th><td>{_who(r)}</td></tr></tbody></table>")
    if bake is None:
        return _page(f"{service} {r['run_id']}", head + "<h2>Bake</h2><p class=muted>No bake recorded: the run did "
                     "not reach the monitoring gate, or its report predates bake recording.</p>")
    if problem:
        return _page(f"{service} {r['run_id']}", head + f"<h2>Bake</h2><p class=bad>The bake cannot be drawn: "
                     f"{_e(problem)}</p>")
    thresholds = bake.get("thresholds") or {}
    steps = "".join(f"<tr><td>{_e(s.get('percent'))} %</td><td>{_time(s.get('started_at'))}</td>"
                    f"<td>{_time(s.get('ended_at'))}</td><td>{_e(s.get('verdict'))}</td></tr>"
                    for s in bake.get("steps") or [])
    readings = "".join(
        f"<tr><td>{_time(x.get('minute'))}</td><td>{_pct(x.get('error_rate'))}</td><td>{_num(x.get('p99_ms'))}</td>"
        f"<td>{_e(x.get('requests') if x.get('requests') is not None else 'no data')}</td></tr>"
        for x in bake.get("readings") or [])
    summary = r.get("bake") or {}
    log_errors = bake.get("log_errors") if isinstance(bake.get("log_errors"), dict) else None
    logs = (f"<h3>Error lines the new tasks logged during the bake: {_e(log_errors.get('count'))}</h3><pre>"
            + "\n".join(_e(line) for line in log_errors.get("samples") or []) + "</pre>") if log_errors else ""
    body = (head + f"<h2>Bake</h2><p>{_bake_text(summary)}</p>"
            f"<p class=muted>Thresholds: 5xx rate {_pct(thresholds.get('max_error_rate'))}, p99 "
            f"{_e(thresholds.get('max_p99_latency_ms'))} ms, no data for at most "
            f"{_e(thresholds.get('missing_data_minutes'))} min. From {_time(bake.get('started_at'))} to "
            f"{_time(bake.get('ended_at')) or 'not ended'}.</p>"
            + _chart(r["links"]["bake_chart"], f"bake of {r['run_id']}", lazy=False)
            + logs
            + ("<h3>Canary steps</h3><table><thead><tr><th>traffic</th><th>from</th><th>to</th><th>verdict</th></tr>"
               f"</thead><tbody>{steps}</tbody></table>" if steps else "")
            + f"<details><summary>{len(bake.get('readings') or [])} readings, one a minute</summary><table><thead>"
            f"<tr><th>minute</th><th>5xx rate</th><th>p99 ms</th><th>requests</th></tr></thead><tbody>{readings}"
            "</tbody></table></details>")
    return _page(f"{service} {r['run_id']}", body)
