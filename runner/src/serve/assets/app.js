// fer dashboard: one page, views chosen by the address's #fragment, data from the JSON API.
// Every element is built with `el`, whose string children become text nodes: no value from the
// database is ever parsed as HTML (a sweep value `<img onerror=…>` shows as those characters).
'use strict';

const view = document.getElementById('view');
const crumbs = document.getElementById('crumbs');
const live = document.getElementById('live');

// ---------------------------------------------------------------- helpers

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// Replace the page's content (nested arrays flattened, nulls skipped, as `el` does).
function show(...children) {
  view.replaceChildren(...children.flat(Infinity).filter(c => c !== null && c !== undefined && c !== false));
}

async function api(path) {
  const r = await fetch(path, { headers: { Accept: 'application/json' } });
  const body = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

const pct = x => (x === null || x === undefined ? '–' : (100 * x).toFixed(2) + ' %');
const fmt = x => (x === null || x === undefined ? '–' : Math.abs(x) >= 100 || Number.isInteger(x) ? String(x) : String(Number(x.toPrecision(4))));
const short = key => key.slice(0, 12);
const text = v => (v === null || v === undefined ? '' : typeof v === 'object' ? JSON.stringify(v) : String(v));
const paramsText = p => Object.entries(p || {}).map(([k, v]) => `${k}=${text(v)}`).join(', ') || '(base)';
const sweepHref = name => '#/sweep/' + encodeURIComponent(name);
const trialHref = key => '#/trial/' + encodeURIComponent(key);

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, query] = raw.split('?');
  return {
    parts: path.split('/').filter(Boolean).map(decodeURIComponent),
    query: new URLSearchParams(query || ''),
  };
}

function setCrumbs(...links) {
  crumbs.replaceChildren(...links.filter(Boolean).map(([label, href]) => (href ? el('a', { href }, label) : el('span', {}, label))));
}

function statusOf(latest) {
  return latest ? latest.status : 'pending';
}

function statusCell(t) {
  const s = statusOf(t.latest);
  const parts = [el('span', { class: 'status-' + s }, s + (t.latest && t.latest.failure_class ? ` (${t.latest.failure_class})` : ''))];
  if (t.latest && t.latest.error && s !== 'completed') parts.push(el('div', { class: 'errtext' }, t.latest.error));
  return parts;
}

// "epoch 3/10, step 40/120" while running; "10/10 epochs" when done.
function progressText(t) {
  const done = t.accuracy.epoch;
  const total = t.epochs;
  const p = t.latest && t.latest.status === 'running' ? t.latest.progress : null;
  if (p) return `epoch ${p.epoch}/${total ?? '?'}, step ${p.step}/${p.steps}`;
  if (done === null || done === undefined) return total ? `0/${total}` : '–';
  return `${done}/${total ?? '?'}`;
}

// ---------------------------------------------------------------- charts (uPlot)

const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];
let charts = [];

function destroyCharts() {
  for (const c of charts) c.destroy();
  charts = [];
}

// series: [{label, points: [[x, y], ...], color?, dash?, width?}]; bands: [[upperIndex, lowerIndex, fill]]
// (indices into series, 0-based).
function lineChart(box, title, series, { percent = false, bands = [] } = {}) {
  const xs = [...new Set(series.flatMap(s => s.points.map(p => p[0])))].sort((a, b) => a - b);
  const data = [xs, ...series.map(s => {
    const at = new Map(s.points.map(p => [p[0], p[1]]));
    return xs.map(x => (at.has(x) ? at.get(x) : null));
  })];
  const scale = percent ? v => (v === null ? v : (100 * v).toFixed(1) + '%') : v => (v === null ? v : fmt(v));
  const opts = {
    title,
    width: Math.max(360, box.clientWidth - 12 || 560),
    height: 280,
    scales: { x: { time: false } },
    // Epochs are whole numbers: no ticks between them.
    axes: [{ label: 'epoch', incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500] }, { values: (u, vals) => vals.map(scale), size: 60 }],
    series: [{ label: 'epoch' }, ...series.map((s, i) => ({
      label: s.label,
      stroke: s.color || PALETTE[i % PALETTE.length],
      width: s.width ?? 1.6,
      dash: s.dash,
      spanGaps: true,
      value: (u, v) => scale(v),
      points: { show: xs.length <= 30 },
    }))],
    bands: bands.map(([hi, lo, fill]) => ({ series: [hi + 1, lo + 1], fill })),
  };
  const chart = new uPlot(opts, data, box);
  charts.push(chart);
  return chart;
}

// ---------------------------------------------------------------- views

// A view: `render()` builds the page (again on every change of the results); it keeps what the
// user chose (filter, sort, selection) in its own state.

function homeView() {
  return {
    async render() {
      const d = await api('/api/sweeps');
      setCrumbs();
      const rows = d.sweeps.map(s => {
        const c = s.counts, total = Object.values(c).reduce((a, b) => a + b, 0);
        return el('tr', { 'data-sweep': s.name },
          el('td', {}, el('a', { href: sweepHref(s.name) }, s.name)),
          el('td', { class: 'num' }, total),
          ['completed', 'running', 'failed', 'interrupted', 'pending'].map(k =>
            el('td', { class: 'num status-' + k }, c[k] || '')),
          el('td', {}, el('a', { href: '#/compare/' + encodeURIComponent(s.name) }, 'curves'), ' · ',
            el('a', { href: '#/parallel/' + encodeURIComponent(s.name) }, 'parallel'),
            s.report ? [' · ', el('a', { href: '/reports/' + encodeURIComponent(s.name), target: '_blank', rel: 'noopener' }, 'report')] : null),
          el('td', { class: 'muted' }, s.file),
          el('td', { class: 'muted' }, s.created_at));
      });
      show(
        el('h1', {}, 'Sweeps'),
        el('p', { class: 'muted' }, 'Results database: ', d.db),
        d.sweeps.length === 0 ? el('p', {}, 'No sweeps yet: run `fer sweep NAME`.') :
          el('table', { id: 'sweeps' },
            el('thead', {}, el('tr', {}, ['sweep', 'trials', 'completed', 'running', 'failed', 'interrupted', 'pending', 'views', 'file', 'created'].map(h => el('th', {}, h)))),
            el('tbody', {}, rows)));
    },
  };
}

// Sort keys per column kind; numbers before text, missing last.
function cmp(a, b) {
  const na = a === null || a === undefined || a === '', nb = b === null || b === undefined || b === '';
  if (na || nb) return na - nb;
  if (typeof a === 'number' && typeof b === 'number') return a - b;
  return String(a).localeCompare(String(b), undefined, { numeric: true });
}

function sweepView(name) {
  const state = { filter: '', sort: null, desc: false, selected: new Set(), data: null };
  let tbody, counter, compareButton;

  // Columns: [header, value for sorting / filtering, cell builder, class].
  function columns(d) {
    const axes = d.axes;
    const cols = [['trial', t => t.key, t => el('a', { href: trialHref(t.key) }, short(t.key))]];
    for (const a of axes) cols.push([a, t => (t.params || {})[a], t => text((t.params || {})[a])]);
    if (!axes.includes('seed')) cols.push(['seed', t => t.seed, t => t.seed, 'num']);
    cols.push(
      ['status', t => statusOf(t.latest), statusCell],
      ['progress', t => (t.latest && t.latest.progress ? t.latest.progress.epoch : t.accuracy.epoch), progressText, 'num progress'],
      ['final', t => t.accuracy.final, t => pct(t.accuracy.final), 'num'],
      ['best', t => t.accuracy.best, t => pct(t.accuracy.best), 'num'],
      ['last 5', t => t.accuracy.last5, t => pct(t.accuracy.last5), 'num'],
      ['val-selected', t => t.accuracy.val_selected, t => pct(t.accuracy.val_selected), 'num'],
      // The plateau rule judges a finished curve: a trial still training is not flagged yet.
      ['plateau', t => (statusOf(t.latest) === 'completed' ? t.accuracy.undertrained : null),
        t => (statusOf(t.latest) !== 'completed' ? '–' : t.accuracy.undertrained === true ? el('span', { class: 'flag', title: 'still improving over the last epochs: not converged' }, 'undertrained')
          : t.accuracy.undertrained === false ? 'converged' : '–')],
      ['attempts', t => t.attempts, t => t.attempts, 'num'],
      ['code', t => t.latest && t.latest.git_commit,
        t => (t.latest && t.latest.git_commit ? t.latest.git_commit.slice(0, 10) + (t.latest.git_dirty ? '+dirty' : '') : '–')]);
    return cols;
  }

  // Every whitespace-separated term must match what the row shows: `name=value` the cell of
  // column `name` (or of `….name`: `heads=4` finds `model.heads`), anything else any cell.
  function matches(cells, names) {
    const terms = state.filter.toLowerCase().split(/\s+/).filter(Boolean);
    const texts = cells.map(c => c.textContent.toLowerCase());
    return terms.every(term => {
      const eq = term.indexOf('=');
      if (eq > 0) {
        const [name, want] = [term.slice(0, eq), term.slice(eq + 1)];
        const i = names.findIndex(n => n === name || n.endsWith('.' + name));
        if (i >= 0) return texts[i].includes(want);
      }
      return texts.some(t => t.includes(term));
    });
  }

  function fillRows() {
    const d = state.data, cols = columns(d);
    const names = cols.map(c => c[0].toLowerCase());
    let trials = d.trials;
    if (state.sort !== null) {
      const key = cols[state.sort][1];
      trials = trials.slice().sort((a, b) => cmp(key(a), key(b)) * (state.desc ? -1 : 1));
    }
    const rows = [];
    for (const t of trials) {
      const cells = cols.map(c => el('td', { class: c[3] || null }, c[2](t)));
      if (!matches(cells, names)) continue;
      rows.push(el('tr', { 'data-key': t.key },
        el('td', {}, el('input', {
          type: 'checkbox', checked: state.selected.has(t.key), 'aria-label': 'select ' + short(t.key),
          onchange: e => { e.target.checked ? state.selected.add(t.key) : state.selected.delete(t.key); updateButtons(); },
        })),
        cells));
    }
    tbody.replaceChildren(...rows);
    counter.textContent = `${rows.length} of ${d.trials.length} trials`;
  }

  function updateButtons() {
    compareButton.disabled = state.selected.size < 1;
    compareButton.textContent = `compare selected (${state.selected.size})`;
  }

  return {
    async render() {
      const d = await api('/api/sweeps/' + encodeURIComponent(name));
      state.data = d;
      setCrumbs(['sweeps', '#/'], [name]);
      if (tbody && view.contains(tbody)) {
        fillRows();
        return;
      }
      const cols = columns(d);
      const head = el('tr', {}, el('th', {}, ''), cols.map((c, i) => el('th', {
        class: 'sortable ' + (c[3] || ''),
        onclick: () => {
          state.desc = state.sort === i ? !state.desc : false;
          state.sort = i;
          head.querySelectorAll('th').forEach((th, j) => th.setAttribute('aria-sort', j === i + 1 ? (state.desc ? 'descending' : 'ascending') : 'none'));
          fillRows();
        },
      }, c[0])));
      tbody = el('tbody');
      counter = el('span', { class: 'muted', id: 'count' });
      compareButton = el('button', {
        id: 'compare',
        onclick: () => { location.hash = `#/compare/${encodeURIComponent(name)}?trials=${[...state.selected].join(',')}`; },
      });
      const groupBy = el('select', { id: 'group-by' }, d.axes.map(a => el('option', { value: a }, a)));
      const c = d.sweep.counts;
      show(
        el('h1', {}, 'Sweep ', name),
        el('p', { class: 'muted' }, d.sweep.file, ' · ',
          ['completed', 'running', 'failed', 'interrupted', 'pending'].filter(k => c[k]).map(k => `${c[k]} ${k}`).join(', ')),
        el('div', { class: 'toolbar' },
          el('input', {
            type: 'search', id: 'filter', value: state.filter,
            placeholder: 'filter: text, or column=value (status=failed heads=4)',
            oninput: e => { state.filter = e.target.value; fillRows(); },
          }),
          counter, compareButton,
          d.axes.length ? [el('button', {
            id: 'compare-grouped',
            onclick: () => { location.hash = `#/compare/${encodeURIComponent(name)}?group=${encodeURIComponent(groupBy.value)}`; },
          }, 'all trials, mean ± std grouped by'), groupBy] : null,
          el('a', { href: '#/parallel/' + encodeURIComponent(name) }, 'parallel coordinates'),
          d.sweep.report ? el('a', { href: '/reports/' + encodeURIComponent(name), target: '_blank', rel: 'noopener' }, 'report') : null),
        el('table', { id: 'trials' }, el('thead', {}, head), tbody),
        el('p', { class: 'muted' }, 'Accuracies are on the test split (final epoch, best epoch, mean of the last 5, ',
          'and at the epoch of best validation accuracy); "undertrained": the last 3 epochs\' mean is below the best, the trial has not converged.'));
      updateButtons();
      fillRows();
    },
  };
}

function trialView(key) {
  const open = new Set();
  return {
    async render() {
      const d = await api('/api/trials/' + encodeURIComponent(key));
      const first = d.sweeps[0];
      setCrumbs(['sweeps', '#/'], first ? [first.name, sweepHref(first.name)] : null, [short(key)].filter(Boolean));
      const latest = d.attempts[d.attempts.length - 1];
      const t = { latest, accuracy: d.accuracy, epochs: d.epochs };

      // One chart per kind of metric: accuracies together, loss terms together, the rest by name.
      const groups = new Map();
      for (const c of d.curves) {
        const name = c.metric.split('/')[1];
        const group = name.includes('accuracy') ? 'accuracy' : name.startsWith('loss') ? 'losses (train)' : name;
        if (!groups.has(group)) groups.set(group, []);
        groups.get(group).push(c);
      }
      const rank = g => (g === 'accuracy' ? 0 : g.startsWith('losses') ? 1 : 2);
      const ordered = [...groups.entries()].sort((x, y) => rank(x[0]) - rank(y[0]) || x[0].localeCompare(y[0]));
      const chartBoxes = ordered.map(([g]) => el('div', { class: 'chart', 'data-chart': g }));

      const attemptRows = d.attempts.map(a => {
        const id = 'stderr-' + a.id;
        return [
          el('tr', { 'data-attempt': a.id },
            el('td', { class: 'num' }, a.id),
            el('td', {}, el('span', { class: 'status-' + a.status }, a.status), a.failure_class ? ` (${a.failure_class})` : ''),
            el('td', {}, a.started_at), el('td', {}, a.ended_at || '–'),
            el('td', {}, `${a.host} pid ${a.pid}`), el('td', {}, a.device), el('td', {}, a.slurm_job || '–'),
            el('td', {}, a.exit_code ?? (a.signal ? 'signal ' + a.signal : '–')),
            el('td', {}, a.git_commit ? a.git_commit.slice(0, 10) + (a.git_dirty ? '+dirty' : '') : '–')),
          a.error || a.stderr_tail ? el('tr', {}, el('td', {}), el('td', { colspan: 8 },
            a.error ? el('div', { class: 'errtext' }, a.error) : null,
            a.stderr_tail ? el('details', { id, open: open.has(id), ontoggle: e => (e.target.open ? open.add(id) : open.delete(id)) },
              el('summary', {}, 'stderr (last lines)'), el('pre', {}, a.stderr_tail)) : null)) : null,
        ];
      });

      destroyCharts();
      show(
        el('h1', {}, 'Trial ', short(key)),
        el('dl', { class: 'facts' },
          el('dt', {}, 'key'), el('dd', {}, d.key),
          el('dt', {}, 'sweeps'), el('dd', {}, d.sweeps.map((s, i) => [i ? '; ' : '', el('a', { href: sweepHref(s.name) }, s.name), ': ', paramsText(s.params)])),
          el('dt', {}, 'seed'), el('dd', {}, d.seed),
          el('dt', {}, 'status'), el('dd', { id: 'trial-status' }, statusOf(latest), ' · ', progressText(t)),
          el('dt', {}, 'test accuracy'), el('dd', {}, `final ${pct(d.accuracy.final)}, best ${pct(d.accuracy.best)}, last 5 ${pct(d.accuracy.last5)}, val-selected ${pct(d.accuracy.val_selected)}`,
            d.accuracy.undertrained && statusOf(latest) === 'completed' ? el('span', { class: 'flag' }, ' · undertrained (not converged)') : null),
          el('dt', {}, 'checkpoint'), el('dd', {}, d.checkpoint.path || '–', d.checkpoint.path ? el('span', { class: 'muted' }, d.checkpoint.exists ? ' (present)' : ' (not on this machine)') : null)),
        el('h2', {}, 'Curves'),
        d.curves.length ? el('div', { class: 'charts' }, chartBoxes) : el('p', { class: 'muted' }, 'No epoch reported yet.'),
        d.confusion ? [el('h2', {}, `Test confusion matrix (epoch ${d.confusion.epoch})`), confusionTable(d.confusion)] : null,
        el('h2', {}, 'Attempts'),
        el('table', { id: 'attempts' },
          el('thead', {}, el('tr', {}, ['#', 'status', 'started', 'ended', 'host', 'device', 'Slurm job', 'exit', 'code'].map(h => el('th', {}, h)))),
          el('tbody', {}, attemptRows)),
        el('h2', {}, 'Config'),
        el('details', { id: 'config', open: open.has('config'), ontoggle: e => (e.target.open ? open.add('config') : open.delete('config')) },
          el('summary', {}, 'resolved config (JSON)'), el('pre', {}, JSON.stringify(d.config, null, 2))));
      ordered.forEach(([g, curves], i) => lineChart(chartBoxes[i], g,
        curves.map(c => ({ label: c.metric, points: c.points })), { percent: g === 'accuracy' }));
    },
  };
}

function confusionTable(c) {
  const names = c.class_names || c.counts.map((_, i) => 'class ' + i);
  return el('table', { class: 'confusion', id: 'confusion' },
    el('thead', {}, el('tr', {}, el('th', {}, 'true \\ predicted'), names.map(n => el('th', {}, n)))),
    el('tbody', {}, c.counts.map((row, i) => {
      const total = row.reduce((a, b) => a + b, 0) || 1;
      return el('tr', {}, el('th', {}, names[i]), row.map(n => {
        const f = n / total;
        return el('td', { style: `background: rgba(47, 111, 222, ${(0.85 * f).toFixed(3)}); color: ${f > 0.55 ? '#fff' : 'inherit'}` },
          n, el('small', {}, (100 * f).toFixed(0) + '%'));
      }));
    })));
}

function compareView(name, query) {
  const state = { metric: query.get('metric') || 'test/accuracy', group: query.get('group') || '' };
  const picked = (query.get('trials') || '').split(',').filter(Boolean);
  return {
    async render() {
      const d = await api('/api/sweeps/' + encodeURIComponent(name));
      if (!d.metrics.includes(state.metric) && d.metrics.length) state.metric = d.metrics.includes('test/accuracy') ? 'test/accuracy' : d.metrics[0];
      const c = await api(`/api/sweeps/${encodeURIComponent(name)}/curves?metric=${encodeURIComponent(state.metric)}`);
      setCrumbs(['sweeps', '#/'], [name, sweepHref(name)], ['compare']);
      const trials = d.trials.filter(t => picked.length === 0 || picked.includes(t.key));
      const percent = state.metric.endsWith('accuracy');
      const box = el('div', { class: 'chart', id: 'compare-chart' });
      const series = [], bands = [], summary = [];
      if (!state.group) {
        for (const t of trials) {
          const points = c.curves[t.key] || [];
          series.push({ label: `${paramsText(t.params)} · ${short(t.key)}`, points });
        }
      } else {
        const groups = new Map();
        for (const t of trials) {
          const v = text((t.params || {})[state.group]);
          if (!groups.has(v)) groups.set(v, []);
          groups.get(v).push(c.curves[t.key] || []);
        }
        const keys = [...groups.keys()].sort((a, b) => cmp(a, b));
        keys.forEach((v, gi) => {
          const curves = groups.get(v);
          const byEpoch = new Map();
          for (const pts of curves) for (const [e, y] of pts) { if (!byEpoch.has(e)) byEpoch.set(e, []); byEpoch.get(e).push(y); }
          const mean = [], hi = [], lo = [];
          for (const [e, ys] of [...byEpoch.entries()].sort((a, b) => a[0] - b[0])) {
            const m = ys.reduce((a, b) => a + b, 0) / ys.length;
            const sd = ys.length > 1 ? Math.sqrt(ys.reduce((a, b) => a + (b - m) ** 2, 0) / (ys.length - 1)) : 0;
            mean.push([e, m]); hi.push([e, m + sd]); lo.push([e, m - sd]);
          }
          const color = PALETTE[gi % PALETTE.length];
          const at = series.length;
          series.push({ label: `${state.group}=${v} mean (n=${curves.length})`, points: mean, color, width: 2 });
          series.push({ label: `${state.group}=${v} +1 sd`, points: hi, color, width: 0.6, dash: [4, 4] });
          series.push({ label: `${state.group}=${v} −1 sd`, points: lo, color, width: 0.6, dash: [4, 4] });
          bands.push([at + 1, at + 2, color + '22']);
          const finals = curves.map(p => (p.length ? p[p.length - 1][1] : null)).filter(x => x !== null);
          const m = finals.reduce((a, b) => a + b, 0) / (finals.length || 1);
          const sd = finals.length > 1 ? Math.sqrt(finals.reduce((a, b) => a + (b - m) ** 2, 0) / (finals.length - 1)) : null;
          summary.push(el('tr', {}, el('td', {}, `${state.group}=${v}`), el('td', { class: 'num' }, finals.length),
            el('td', { class: 'num' }, finals.length ? (percent ? pct(m) : fmt(m)) : '–'),
            el('td', { class: 'num' }, sd === null ? '–' : percent ? pct(sd) : fmt(sd))));
        });
      }
      const metricSelect = el('select', {
        id: 'metric',
        onchange: e => { state.metric = e.target.value; refresh(); },
      }, d.metrics.map(m => el('option', { value: m, selected: m === state.metric }, m)));
      const groupSelect = el('select', {
        id: 'group',
        onchange: e => { state.group = e.target.value; refresh(); },
      }, el('option', { value: '' }, 'none: one line per trial'), d.axes.map(a => el('option', { value: a, selected: a === state.group }, a)));
      destroyCharts();
      show(
        el('h1', {}, 'Compare: ', name),
        el('p', { class: 'muted' }, picked.length ? `${trials.length} selected trials` : `all ${trials.length} trials`,
          state.group ? ` grouped by ${state.group}: mean per epoch, band ±1 sample standard deviation over the group's trials (seeds)` : ''),
        el('div', { class: 'toolbar' }, 'metric ', metricSelect, ' group by ', groupSelect),
        box,
        summary.length ? el('table', { id: 'groups' },
          el('thead', {}, el('tr', {}, ['group', 'n', 'last epoch: mean', 'sd'].map(h => el('th', {}, h)))),
          el('tbody', {}, summary)) : null);
      if (series.length) lineChart(box, state.metric, series, { percent, bands });
      else box.append(el('p', { class: 'muted' }, 'No trials to compare.'));
    },
  };
}

// Parallel coordinates: one vertical axis per swept parameter and one for the metric; one line
// per trial with a value, coloured by it.
function parallelView(name, query) {
  const state = { metric: query.get('metric') || 'final' };
  const METRICS = { final: 'final test accuracy', best: 'best test accuracy', last5: 'mean of last 5', val_selected: 'val-selected test accuracy' };
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const colour = f => {
    const x = Math.min(0.9999, Math.max(0, f)) * (VIRIDIS.length - 1), i = Math.floor(x), r = x - i;
    const [a, b] = [VIRIDIS[i], VIRIDIS[i + 1]];
    return `rgb(${a.map((v, k) => Math.round(v + r * (b[k] - v))).join(',')})`;
  };
  const NS = 'http://www.w3.org/2000/svg';
  const svgEl = (tag, attrs, ...kids) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  };
  return {
    async render() {
      const d = await api('/api/sweeps/' + encodeURIComponent(name));
      setCrumbs(['sweeps', '#/'], [name, sweepHref(name)], ['parallel coordinates']);
      // Completed trials only: a running or failed trial's accuracy is not a result.
      const rows = d.trials.filter(t => statusOf(t.latest) === 'completed' &&
        t.accuracy[state.metric] !== null && t.accuracy[state.metric] !== undefined);
      // Hyper-parameters only: seeds are replicates, not a setting.
      let axes = d.axes.filter(a => a !== 'seed' && new Set(d.trials.map(t => text((t.params || {})[a]))).size > 1);
      if (!axes.length) axes = d.axes.slice();
      const W = Math.max(640, view.clientWidth - 20), H = 420, top = 30, bottom = 40, left = 70;
      const x = i => left + i * ((W - 2 * left) / Math.max(1, axes.length));
      const y = f => top + (1 - f) * (H - top - bottom);
      // Each axis maps a value to [0, 1]: numbers linearly, anything else by sorted position.
      const scales = axes.map(a => {
        const vals = d.trials.map(t => (t.params || {})[a]);
        if (vals.every(v => typeof v === 'number')) {
          const lo = Math.min(...vals), hi = Math.max(...vals);
          return { pos: v => (hi === lo ? 0.5 : (v - lo) / (hi - lo)), ticks: [...new Set(vals)].sort((p, q) => p - q) };
        }
        const cats = [...new Set(vals.map(text))].sort((p, q) => cmp(p, q));
        return { pos: v => (cats.length === 1 ? 0.5 : cats.indexOf(text(v)) / (cats.length - 1)), ticks: cats };
      });
      const values = rows.map(t => t.accuracy[state.metric]);
      const mlo = Math.min(...values), mhi = Math.max(...values);
      const mpos = v => (mhi === mlo ? 0.5 : (v - mlo) / (mhi - mlo));
      const svg = svgEl('svg', { class: 'parallel', id: 'parallel', width: W, height: H, viewBox: `0 0 ${W} ${H}` });
      for (const t of rows) {
        const v = t.accuracy[state.metric];
        const pts = axes.map((a, i) => `${x(i)},${y(scales[i].pos((t.params || {})[a]))}`);
        pts.push(`${x(axes.length)},${y(mpos(v))}`);
        const line = svgEl('polyline', { points: pts.join(' '), stroke: colour(mpos(v)), 'data-key': t.key },
          svgEl('title', {}, `${paramsText(t.params)} · seed ${t.seed}: ${pct(v)}`));
        line.addEventListener('click', () => { location.hash = trialHref(t.key); });
        svg.append(line);
      }
      axes.forEach((a, i) => {
        const g = svgEl('g', { class: 'axis' }, svgEl('line', { x1: x(i), x2: x(i), y1: top, y2: H - bottom }),
          svgEl('text', { x: x(i), y: H - bottom + 22, 'text-anchor': 'middle' }, a));
        const ticks = scales[i].ticks;
        const shown = ticks.length > 12 ? [ticks[0], ticks[ticks.length - 1]] : ticks;
        for (const tk of shown) g.append(svgEl('text', { x: x(i) - 6, y: y(scales[i].pos(tk)) + 4, 'text-anchor': 'end' }, text(tk)));
        svg.append(g);
      });
      const mx = x(axes.length);
      svg.append(svgEl('g', { class: 'axis' }, svgEl('line', { x1: mx, x2: mx, y1: top, y2: H - bottom }),
        svgEl('text', { x: mx, y: H - bottom + 22, 'text-anchor': 'middle' }, METRICS[state.metric]),
        ...(rows.length ? [svgEl('text', { x: mx + 6, y: y(1) + 4 }, pct(mhi)), svgEl('text', { x: mx + 6, y: y(0) + 4 }, pct(mlo))] : [])));
      destroyCharts();
      show(
        el('h1', {}, 'Parallel coordinates: ', name),
        el('div', { class: 'toolbar' }, 'metric ', el('select', {
          id: 'metric', onchange: e => { state.metric = e.target.value; refresh(); },
        }, Object.entries(METRICS).map(([k, label]) => el('option', { value: k, selected: k === state.metric }, label))),
        el('span', { class: 'muted' }, `${rows.length} of ${d.trials.length} trials completed with a value; colour: `),
        el('span', { class: 'legend-bar' }), el('span', { class: 'muted' }, ` ${pct(mlo)} … ${pct(mhi)}; click a line for its trial`)),
        rows.length ? svg : el('p', { class: 'muted' }, 'No completed trial yet.'));
    },
  };
}

// ---------------------------------------------------------------- routing and live updates

let current = null;
let rendering = Promise.resolve();

function route() {
  const { parts, query } = parseHash();
  destroyCharts();
  if (parts[0] === 'sweep' && parts[1]) current = sweepView(parts[1]);
  else if (parts[0] === 'trial' && parts[1]) current = trialView(parts[1]);
  else if (parts[0] === 'compare' && parts[1]) current = compareView(parts[1], query);
  else if (parts[0] === 'parallel' && parts[1]) current = parallelView(parts[1], query);
  else current = homeView();
  show(el('p', { class: 'muted' }, 'Loading…'));
  refresh();
}

// Renders run one at a time; a change that arrives during one is drawn after it.
function refresh() {
  const v = current;
  rendering = rendering.then(() => (v === current ? v.render() : null)).catch(e => {
    show(el('h1', {}, 'Error'), el('p', { class: 'error' }, e.message));
  });
  return rendering;
}

function listen() {
  const events = new EventSource('/api/events');
  events.addEventListener('open', () => { live.className = 'on'; live.title = 'live updates: on'; });
  events.addEventListener('error', () => { live.className = 'off'; live.title = 'live updates: reconnecting'; });
  events.addEventListener('change', e => {
    const first = !live.dataset.version;
    live.dataset.version = e.data;
    if (!first) refresh();
  });
}

window.addEventListener('hashchange', route);
window.addEventListener('resize', () => { for (const c of charts) c.setSize({ width: Math.max(360, c.root.parentElement.clientWidth - 12), height: 280 }); });
route();
listen();
