// The A/B's HTML report: one self-contained file with the table and inline SVG plots (score per
// task and method, score vs real KV bytes, decode latency).
import type { AbResult } from './ab.js';

const COLORS = ['#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f', '#edc948', '#b07aa1', '#ff9da7', '#9c755f'];

function esc(s: string): string {
  return s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]!);
}

/** Grouped bars: one group per task (plus the average), one bar per method, 0-100. */
function scoreBars(r: AbResult, methods: string[]): string {
  const groups = [...r.tasks, 'average'];
  const w = 720, h = 260, left = 40, bottom = 40;
  const gw = (w - left) / groups.length;
  const bw = (gw * 0.8) / methods.length;
  const y = (v: number) => h - bottom - ((h - bottom - 10) * v) / 100;
  const bars = groups.flatMap((g, gi) => methods.map((m, mi) => {
    const x = r.methods[m]!;
    const v = g === 'average' ? x.score : x.tasks[g] ?? 0;
    return `<rect x="${left + gi * gw + gw * 0.1 + mi * bw}" y="${y(v)}" width="${bw - 1}" height="${h - bottom - y(v)}" fill="${COLORS[mi % COLORS.length]}"><title>${esc(m)} ${esc(g)}: ${v.toFixed(1)}</title></rect>`;
  }));
  const labels = groups.map((g, gi) => `<text x="${left + gi * gw + gw / 2}" y="${h - bottom + 16}" text-anchor="middle" font-size="11">${esc(g)}</text>`);
  const ticks = [0, 50, 100].map((v) => `<text x="${left - 6}" y="${y(v) + 4}" text-anchor="end" font-size="10">${v}</text><line x1="${left}" x2="${w}" y1="${y(v)}" y2="${y(v)}" stroke="#ddd"/>`);
  return `<svg width="${w}" height="${h}" xmlns="http://www.w3.org/2000/svg">${ticks.join('')}${bars.join('')}${labels.join('')}</svg>`;
}

/** Scatter: x = real KV bytes (MiB), y = score; one point per method. */
function scoreVsBytes(r: AbResult, methods: string[]): string {
  const w = 480, h = 300, left = 50, bottom = 40;
  const maxB = Math.max(...methods.map((m) => Math.max(r.methods[m]!.kv_bytes, r.methods[m]!.full_kv_bytes))) / 2 ** 20 || 1;
  const x = (b: number) => left + ((w - left - 20) * b) / maxB;
  const y = (v: number) => h - bottom - ((h - bottom - 10) * v) / 100;
  const points = methods.map((m, i) => {
    const p = r.methods[m]!;
    const bx = x(p.kv_bytes / 2 ** 20), by = y(p.score);
    return `<circle cx="${bx}" cy="${by}" r="6" fill="${COLORS[i % COLORS.length]}"><title>${esc(m)}</title></circle><text x="${bx + 8}" y="${by - 6}" font-size="11">${esc(m)}</text>`;
  });
  const axes = `<line x1="${left}" y1="${h - bottom}" x2="${w}" y2="${h - bottom}" stroke="#999"/><line x1="${left}" y1="0" x2="${left}" y2="${h - bottom}" stroke="#999"/>`
    + `<text x="${(w + left) / 2}" y="${h - 8}" text-anchor="middle" font-size="11">real KV MiB per request (end of prefill)</text>`
    + `<text x="12" y="${(h - bottom) / 2}" font-size="11" transform="rotate(-90 12 ${(h - bottom) / 2})" text-anchor="middle">score</text>`
    + `<text x="${x(maxB)}" y="${h - bottom + 14}" font-size="10" text-anchor="end">${maxB.toFixed(2)}</text>`;
  return `<svg width="${w}" height="${h}" xmlns="http://www.w3.org/2000/svg">${axes}${points.join('')}</svg>`;
}

/** Horizontal bars of decode latency (ms per token). */
function latencyBars(r: AbResult, methods: string[]): string {
  const w = 480, rowH = 22, left = 170;
  const max = Math.max(...methods.map((m) => r.methods[m]!.decode_ms_per_token)) || 1;
  const rows = methods.map((m, i) => {
    const v = r.methods[m]!.decode_ms_per_token;
    return `<text x="${left - 6}" y="${i * rowH + 15}" text-anchor="end" font-size="11">${esc(m)}</text><rect x="${left}" y="${i * rowH + 4}" width="${((w - left - 60) * v) / max}" height="${rowH - 8}" fill="${COLORS[i % COLORS.length]}"/><text x="${left + ((w - left - 60) * v) / max + 4}" y="${i * rowH + 15}" font-size="10">${v.toFixed(0)} ms</text>`;
  });
  return `<svg width="${w}" height="${methods.length * rowH + 8}" xmlns="http://www.w3.org/2000/svg">${rows.join('')}</svg>`;
}

export function renderReport(r: AbResult): string {
  const methods = Object.keys(r.methods);
  const rows = methods.map((m) => {
    const x = r.methods[m]!;
    const cells = [x.score.toFixed(1), (x.kv_bytes / 2 ** 20).toFixed(2), (x.full_kv_bytes / x.kv_bytes).toFixed(2), x.prefill_ms.toFixed(0), x.decode_ms_per_token.toFixed(0), ...r.tasks.map((t) => (x.tasks[t] ?? NaN).toFixed(1))];
    return `<tr><th>${esc(m)}</th>${cells.map((c) => `<td>${c}</td>`).join('')}</tr>`;
  });
  const head = ['method', 'score', 'KV MiB', '× less than full', 'prefill ms', 'decode ms/token', ...r.tasks].map((h) => `<th>${esc(h)}</th>`).join('');
  return `<!doctype html><html><head><meta charset="utf-8"><title>mosaickv ab: ${esc(r.model)} at ${r.ctx} tokens</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child{text-align:left}</style></head><body>
<h1>A/B: ${esc(r.model)}, ${r.ctx}-token context, ${r.samples} sample(s) per task</h1>
<p>Methods at the same real memory: budget ratio ${r.budget_ratio} (dense KV bytes / method's bytes) where the method can fit it. KV bytes are the real bytes of each request's cache at the end of prefill, as reported by the worker.</p>
<table><tr>${head}</tr>${rows.join('')}</table>
<h2>Score per task and method</h2>${scoreBars(r, methods)}
<h2>Score vs real KV bytes</h2>${scoreVsBytes(r, methods)}
<h2>Decode latency</h2>${latencyBars(r, methods)}
</body></html>
`;
}
