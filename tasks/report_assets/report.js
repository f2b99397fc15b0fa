'use strict';
// The review page's behaviour: filters, sort and the sensitivity slider over the cards, the
// review (a decision per card, by keyboard or mouse, kept in localStorage and exported as
// decisions.csv) and lazy rendering (the grid holds one page of the matching cards, more as
// the reviewer scrolls). Everything it needs is in the page: the grid's and each card's
// data-* attributes and the class picker, written by tasks/report.py. It loads nothing (the
// page's Content-Security-Policy forbids it); export and load are local (a blob: download, a
// FileReader).
(() => {
  const $ = (id) => document.getElementById(id);
  const num = (n) => n.toLocaleString('en-US');  // 5,000 as the rest of the page writes it

  const grid = $('grid');
  const RUN_ID = grid.dataset.runId;
  const PAGE = Number(grid.dataset.page) || 200;
  const COLUMNS = grid.dataset.columns.split(',');  // tasks.decisions: the file's header
  const STORE = 'auto-correct-labels/review/' + RUN_ID;
  const REVIEWER_STORE = 'auto-correct-labels/reviewer';
  const DECISIONS = ['accept', 'keep', 'other', 'skip'];
  const controls = {
    tier: $('f-tier'),
    given: $('f-given'),
    suggested: $('f-suggested'),
    state: $('f-state'),
    review: $('f-review'),
    sort: $('f-sort'),
    text: $('f-text'),
    sensitivity: $('f-sens'),
    reset: $('f-reset'),
  };
  const classButtons = Array.from($('picker-list').querySelectorAll('button'));
  const CLASSES = classButtons.map((b) => b.dataset.class);

  // --- the cards ----------------------------------------------------------------------------

  // One record per card, read once from its data attributes: the first page is in the grid,
  // the rest in an inert <template> until shown.
  const later = $('more-cards');
  const cardEls = Array.from(grid.querySelectorAll('.card'));
  if (later) cardEls.push(...later.content.querySelectorAll('.card'));
  const items = cardEls.map((el) => ({
    el,
    verdict: el.querySelector('.verdict'),
    rank: Number(el.dataset.rank),
    name: el.dataset.name,
    label: el.dataset.label,
    suggested: el.dataset.suggested,
    pct: Number(el.dataset.pct),
    quality: Number(el.dataset.quality),
    flagged: el.dataset.flagged === '1',
    tier: el.dataset.tier,  // issue, review or ok (tasks.decide.TIERS)
    // The sensitivity below which the image is relabelled (tasks.relabel.relabel_ceiling);
    // -1 when it never is.
    ceiling: Number(el.dataset.ceiling),
    decorated: false,
  }));
  const byName = new Map(items.map((item) => [item.name, item]));

  // The relabel rule, as tasks.relabel.select_rows applies it.
  const wouldRelabel = (item, sensitivity) => sensitivity < item.ceiling;

  const byRank = (a, b) => a.rank - b.rank;
  const SORTERS = {
    rank: byRank,
    pct: (a, b) => b.pct - a.pct || byRank(a, b),
    quality: (a, b) => a.quality - b.quality || byRank(a, b),
    name: (a, b) => a.name.localeCompare(b.name),
  };

  // --- decisions: name -> {decision, newLabel, reviewer, decidedAt} --------------------------

  const decisions = new Map();
  const undoStack = [];  // each entry: the previous values of the cards one action changed
  let saveFailed = false;

  function readStore() {
    let saved = null;
    try {
      saved = JSON.parse(localStorage.getItem(STORE) || 'null');
    } catch (err) {
      saved = null;
    }
    for (const [name, d] of Object.entries((saved && saved.decisions) || {})) {
      const item = byName.get(name);
      if (item && d.label === item.label && DECISIONS.includes(d.decision)) {
        decisions.set(name, {decision: d.decision, newLabel: d.newLabel || '',
          reviewer: d.reviewer || '', decidedAt: d.decidedAt || ''});
      }
    }
  }

  function writeStore() {
    const out = {};
    for (const [name, d] of decisions) out[name] = {...d, label: byName.get(name).label};
    try {
      localStorage.setItem(STORE, JSON.stringify({run: RUN_ID, decisions: out}));
      saveFailed = false;
    } catch (err) {  // storage off or full: the decisions live until the tab closes
      saveFailed = true;
    }
  }

  const now = () => new Date().toISOString().replace(/\.\d{3}Z$/, 'Z');

  // The decision a chosen class means for a card: its own label is keep, the suggestion
  // accept, any other class other.
  function forClass(item, cls) {
    if (cls === item.label) return {decision: 'keep', newLabel: ''};
    if (cls === item.suggested) return {decision: 'accept', newLabel: cls};
    return {decision: 'other', newLabel: cls};
  }

  function decisionOf(item, decision) {
    if (decision === 'accept') return forClass(item, item.suggested);  // keep when unchanged
    return {decision, newLabel: ''};
  }

  function set(changes) {
    for (const {item, value} of changes) {
      if (value) decisions.set(item.name, value);
      else decisions.delete(item.name);
    }
    writeStore();
    return changes.map(({item}) => item);
  }

  // Set (or, with a null value, clear) decisions as one undoable action.
  function apply(changes) {
    undoStack.push(changes.map(({item}) => ({item, value: decisions.get(item.name) || null})));
    return set(changes);
  }

  // Decide the card under the cursor (the first key only shows the cursor), then move on.
  function decide(item, value) {
    if (!item) return focusAt(lastIndex);
    if (!value && !decisions.has(item.name)) return;
    note('');
    const next = order[order.indexOf(item) + 1] || null;
    const changed = apply([{item, value: value && {...value, reviewer: reviewer(),
      decidedAt: now()}}]);
    afterChange(value ? next || item : item, changed);
  }

  function undo() {
    const changes = undoStack.pop();
    if (!changes) return note('nothing to undo');
    afterChange(changes[0].item, set(changes));
    note('undone' + (changes.length > 1 ? ' (' + changes.length + ' decisions)' : ''));
  }

  const reviewer = () => $('reviewer').value.trim();

  // --- the grid: filter, sort, and a window of the matching cards ----------------------------

  let order = [];  // the cards that match the filters, in the chosen order
  let limit = PAGE;  // how many of them are in the grid
  let cursor = null;  // the card the keys act on

  function readFilters() {
    return {
      tier: controls.tier.value,
      given: controls.given.value,
      suggested: controls.suggested.value,
      state: controls.state.value,
      review: controls.review.value,
      text: controls.text.value.trim().toLowerCase(),
      sensitivity: Number(controls.sensitivity.value),
    };
  }

  function reviewMatches(item, review) {
    const d = decisions.get(item.name);
    if (review === 'todo') return !d;
    if (review === 'done') return Boolean(d);
    return d ? d.decision === review : false;
  }

  function matches(item, f) {
    return (!f.tier || item.tier === f.tier)
      && (!f.given || item.label === f.given)
      && (!f.suggested || item.suggested === f.suggested)
      && (!f.state || (f.state === 'relabel') === item.relabel)
      && (!f.review || reviewMatches(item, f.review))
      && (!f.text || item.name.toLowerCase().includes(f.text));
  }

  function showVerdict(item) {
    item.el.dataset.relabel = item.relabel ? '1' : '0';
    item.el.classList.toggle('relabel', item.relabel);
    item.verdict.textContent = item.relabel ? 'would relabel'
      : item.flagged ? 'issue, below threshold'
        : item.tier === 'review' ? 'to review' : 'not flagged';
  }

  const ACTIONS = [['accept', 'a', 'accept'], ['keep', 'n', 'keep'], ['other', 'o', 'other'],
    ['skip', 's', 'skip']];

  // The review parts of a card, added when it is first shown: its decision and its buttons.
  function decorate(item) {
    if (item.decorated) return;
    item.decorated = true;
    item.badge = document.createElement('span');
    item.badge.className = 'decision';
    item.el.querySelector('.thumb').append(item.badge);
    item.el.querySelector('.fname').title = item.name;  // the whole name where it is cut
    const bar = document.createElement('div');
    bar.className = 'actions';
    item.buttons = [];
    for (const [act, key, text] of ACTIONS) {
      if (act === 'accept' && item.label === item.suggested) continue;  // that is keep
      const button = document.createElement('button');
      button.type = 'button';
      button.dataset.act = act;
      button.title = text + ' (' + key + ')';
      button.textContent = text;
      item.buttons.push(button);
    }
    bar.append(...item.buttons);
    item.el.append(bar);
  }

  const SHOWN = {accept: 'accepted', keep: 'kept', other: 'other', skip: 'skipped'};

  function showDecision(item) {
    if (!item.decorated) return;
    const d = decisions.get(item.name);
    for (const name of DECISIONS) item.el.classList.toggle('d-' + name, Boolean(d)
      && d.decision === name);
    item.el.dataset.decision = d ? d.decision : '';
    item.badge.textContent = !d ? '' : SHOWN[d.decision] + (d.newLabel ? ' → ' + d.newLabel : '');
    for (const button of item.buttons) {
      button.classList.toggle('on', Boolean(d) && d.decision === button.dataset.act);
    }
  }

  let inGrid = {order: null, count: 0};  // the grid holds the first `count` cards of `order`

  // Show the first `limit` cards of `order`: only the new ones when the list is the same.
  function fillGrid() {
    const count = Math.min(limit, order.length);
    const from = inGrid.order === order && count >= inGrid.count ? inGrid.count : 0;
    const added = document.createDocumentFragment();
    for (const item of order.slice(from, count)) {
      decorate(item);
      showVerdict(item);
      showDecision(item);
      added.append(item.el);
    }
    if (from) grid.append(added);
    else grid.replaceChildren(added);
    inGrid = {order, count};
    const rest = order.length - count;
    $('more').hidden = rest <= 0;
    $('more-button').textContent = 'show ' + num(Math.min(rest, PAGE)) + ' more (' + num(rest)
      + ' not shown yet)';
    const at = cursor ? order.indexOf(cursor) : -1;
    if (cursor && (at < 0 || at >= count)) setCursor(null);
  }

  let relabelled = 0;  // cards that would be relabelled at the slider's sensitivity

  function update() {
    const f = readFilters();
    $('sens-value').textContent = f.sensitivity + '%';
    relabelled = 0;
    for (const item of items) {
      item.relabel = wouldRelabel(item, f.sensitivity);
      if (item.relabel) relabelled++;
    }
    order = items.filter((item) => matches(item, f))
      .sort(SORTERS[controls.sort.value] || SORTERS.rank);
    fillGrid();
    showCounts(f);
  }

  function showCounts(f) {
    $('shown').textContent = 'showing ' + num(order.length) + ' of ' + num(items.length)
      + ' · ' + num(relabelled) + ' would be relabelled at > ' + f.sensitivity + '%';
    progress();
  }

  // A filter or sort changed: back to the first page.
  function refilter() {
    limit = PAGE;
    update();
  }

  function progress() {
    const n = {accept: 0, keep: 0, other: 0, skip: 0};
    for (const d of decisions.values()) n[d.decision]++;
    $('progress').textContent = 'reviewed ' + num(decisions.size) + ' of ' + num(items.length)
      + ', ' + num(n.accept) + ' accepted, ' + num(n.keep) + ' kept, ' + num(n.other)
      + ' other, ' + num(n.skip) + ' skipped'
      + (saveFailed ? ' (not saved in this browser: export them)' : '');
  }

  // After decisions changed: show them, and put the cursor on `target` where it is listed.
  function afterChange(target, changed) {
    const f = readFilters();
    const listed = new Set(order);
    if (changed.some((item) => matches(item, f) && !listed.has(item))) {
      update();  // the review filter shows a card again (an undo): list them anew
    } else {
      for (const item of changed) {
        if (matches(item, f)) showDecision(item);
        else if (listed.has(item)) {  // the review filter hides it now: take it out
          const at = order.indexOf(item);
          order.splice(at, 1);
          if (at < inGrid.count) inGrid.count--;
          item.el.remove();
        }
      }
      fillGrid();  // the same list: tops the grid up to `limit`
      showCounts(f);
    }
    const at = order.indexOf(target);
    if (at >= 0) focusAt(at);
    else if (order.length) focusAt(Math.min(order.length - 1, Math.max(0, lastIndex)));
  }

  // --- moving between cards ------------------------------------------------------------------

  let lastIndex = 0;
  // Scrolling near the end of the grid shows the next page of cards.
  const sentinel = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) more();
  }, {rootMargin: '0px 0px 1200px 0px'});

  function setCursor(item) {
    if (cursor) cursor.el.classList.remove('current');
    cursor = item;
    if (!item) return;
    lastIndex = order.indexOf(item);
    item.el.classList.add('current');
    item.el.scrollIntoView({block: 'nearest'});
  }

  function focusAt(index) {
    if (!order.length) return setCursor(null);
    const at = Math.max(0, Math.min(order.length - 1, index));
    if (at >= limit) {
      limit = Math.ceil((at + 1) / PAGE) * PAGE;
      fillGrid();
    }
    setCursor(order[at]);
  }

  function move(delta) {
    const at = cursor ? order.indexOf(cursor) : -1;
    focusAt(at < 0 ? (delta < 0 ? lastIndex - 1 : lastIndex) : at + delta);
  }

  function columns() {
    return getComputedStyle(grid).gridTemplateColumns.split(' ').filter(Boolean).length || 1;
  }

  function more() {
    limit += PAGE;
    fillGrid();
    sentinel.unobserve($('more'));  // still in view: the next callback adds another page
    sentinel.observe($('more'));
  }

  // --- the class picker (o) and the help (?) ------------------------------------------------

  let picking = null;  // the card the picker chooses a class for
  let highlighted = 0;

  function pickerShown() {
    return classButtons.filter((b) => !b.parentElement.hidden);
  }

  function highlight(index) {
    const shown = pickerShown();
    highlighted = Math.max(0, Math.min(shown.length - 1, index));
    shown.forEach((b, i) => b.classList.toggle('hl', i === highlighted));
    if (shown[highlighted]) shown[highlighted].scrollIntoView({block: 'nearest'});
  }

  function filterPicker() {
    const q = $('picker-q').value.trim().toLowerCase();
    for (const b of classButtons) b.parentElement.hidden = !b.dataset.class.toLowerCase()
      .includes(q);
    highlight(0);
  }

  function openPicker(item) {
    if (!item) return focusAt(lastIndex);
    picking = item;
    $('picker-for').textContent = item.name + ': given ' + item.label + ', suggested '
      + item.suggested;
    for (const b of classButtons) {
      b.classList.toggle('given', b.dataset.class === item.label);
      b.classList.toggle('sugg', b.dataset.class === item.suggested);
    }
    $('picker-q').value = '';
    filterPicker();
    $('picker').hidden = false;
    $('picker-q').focus();
  }

  function closePicker() {
    picking = null;
    $('picker').hidden = true;
    $('picker-q').blur();
  }

  function pick(cls) {
    const item = picking;
    closePicker();
    if (item && CLASSES.includes(cls)) decide(item, forClass(item, cls));
  }

  function pickerKey(e) {
    const empty = !$('picker-q').value;
    if (e.key === 'Escape') closePicker();
    else if (e.key === 'Enter') {
      const b = pickerShown()[highlighted];
      if (b) pick(b.dataset.class);
    } else if (e.key === 'ArrowDown') highlight(highlighted + 1);
    else if (e.key === 'ArrowUp') highlight(highlighted - 1);
    else if (empty && /^[1-9]$/.test(e.key)) pick(CLASSES[Number(e.key) - 1]);
    else return;
    e.preventDefault();
  }

  function toggleHelp(show) {
    $('help').hidden = !(show ?? $('help').hidden);
  }

  // --- keys ----------------------------------------------------------------------------------

  function reviewKey(e) {
    const item = cursor;
    switch (e.key) {
      case 'j': case 'ArrowRight': move(1); break;
      case 'k': case 'ArrowLeft': move(-1); break;
      case 'ArrowDown': move(columns()); break;
      case 'ArrowUp': move(-columns()); break;
      case 'Home': focusAt(0); break;
      case 'End': focusAt(order.length - 1); break;
      case 'a': decide(item, item && decisionOf(item, 'accept')); break;
      case 'n': decide(item, item && decisionOf(item, 'keep')); break;
      case 's': decide(item, item && decisionOf(item, 'skip')); break;
      case 'o': openPicker(item); break;
      case 'Backspace': decide(item, null); break;
      case 'u': undo(); break;
      case '?': toggleHelp(); break;
      case 'Escape': toggleHelp(false); break;
      default:
        if (!/^[1-9]$/.test(e.key)) return;
        if (item && CLASSES[Number(e.key) - 1]) decide(item, forClass(item,
          CLASSES[Number(e.key) - 1]));
    }
    e.preventDefault();
  }

  document.addEventListener('keydown', (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    if (!$('picker').hidden) return pickerKey(e);
    const field = e.target.closest && e.target.closest('input, select, textarea');
    if (field) {  // typing in a field; Esc leaves it for the review keys
      if (e.key === 'Escape') field.blur();
      return;
    }
    if (!$('help').hidden && e.key !== '?' && e.key !== 'Escape') toggleHelp(false);
    reviewKey(e);
  });

  // --- decisions.csv: export and load ------------------------------------------------------

  // RFC 4180, as Python's csv module reads it: quote a field with a comma, quote or newline.
  const cell = (v) => (/[",\r\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v);

  function toCsv() {
    const lines = [COLUMNS.join(',')];
    for (const item of items.slice().sort(byRank)) {
      const d = decisions.get(item.name);
      if (!d) continue;
      const row = {filename: item.name, label: item.label, decision: d.decision,
        new_label: d.newLabel, reviewer: d.reviewer, decided_at: d.decidedAt, run_id: RUN_ID};
      lines.push(COLUMNS.map((c) => cell(row[c] ?? '')).join(','));
    }
    return lines.join('\n') + '\n';
  }

  function exportCsv() {
    const blob = new Blob([toCsv()], {type: 'text/csv;charset=utf-8'});
    const a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = 'decisions.csv';
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    note('exported ' + decisions.size + ' decisions as decisions.csv');
  }

  function parseCsv(text) {
    const rows = [];
    let row = [];
    let field = '';
    let quoted = false;
    let inQuotes = false;
    for (let i = 0; i < text.length; i++) {
      const c = text[i];
      if (inQuotes) {
        if (c !== '"') field += c;
        else if (text[i + 1] === '"') field += text[i++];
        else inQuotes = false;
      } else if (c === '"' && field === '' && !quoted) {
        inQuotes = quoted = true;
      } else if (c === ',') {
        row.push(field);
        field = '';
        quoted = false;
      } else if (c === '\n' || c === '\r') {
        if (c === '\r' && text[i + 1] === '\n') i++;
        row.push(field);
        rows.push(row);
        row = [];
        field = '';
        quoted = false;
      } else {
        field += c;
      }
    }
    if (field !== '' || quoted || row.length) {
      row.push(field);
      rows.push(row);
    }
    return rows.filter((r) => !(r.length === 1 && r[0] === ''));
  }

  // Why one row of a decisions file cannot be shown on this page, or null.
  function rowProblem(r, item) {
    if (!item) return 'not in this report';
    if (r.label !== item.label) return 'label ' + r.label + ', the report says ' + item.label;
    if (!DECISIONS.includes(r.decision)) return 'decision ' + r.decision + ' is unknown';
    if (r.decision === 'accept' && r.new_label !== item.suggested) {
      return 'accept with new_label ' + r.new_label + ', the suggestion is ' + item.suggested;
    }
    if (r.decision === 'other' && !CLASSES.includes(r.new_label)) {
      return 'other with new_label ' + r.new_label + ', not a class of this run';
    }
    return null;
  }

  function loadCsv(text, source) {
    const rows = parseCsv(text.replace(/^\ufeff/, ''));
    const header = rows.shift() || [];
    const missing = COLUMNS.filter((c) => c !== 'run_id' && !header.includes(c));
    if (missing.length) return note(source + ': missing column(s) ' + missing.join(', '));
    const records = rows.map((values) => Object.fromEntries(header.map((c, j) => [c,
      values[j] ?? ''])));
    const other = records.find((r) => r.run_id && r.run_id !== RUN_ID);
    if (other) {
      return note(source + ' is for run ' + other.run_id + ', this report is run ' + RUN_ID
        + ': nothing loaded');
    }
    const changes = [];
    const problems = [];
    records.forEach((r, i) => {
      const item = byName.get(r.filename);
      const why = rowProblem(r, item);
      if (why) {
        problems.push('line ' + (i + 2) + ' (' + r.filename + '): ' + why);
        return;
      }
      changes.push({item, value: {decision: r.decision, newLabel: r.decision === 'accept'
        || r.decision === 'other' ? r.new_label : '', reviewer: r.reviewer,
      decidedAt: r.decided_at}});
    });
    afterChange(changes.length ? changes[0].item : cursor, changes.length ? apply(changes)
      : []);
    note('loaded ' + changes.length + ' decisions from ' + source
      + (problems.length ? '; ' + problems.length + (problems.length === 1 ? ' row' : ' rows')
        + ' left out, e.g. ' + problems[0] : ''));
  }

  function loadFile(file) {
    const reader = new FileReader();
    reader.onload = () => loadCsv(String(reader.result), file.name);
    reader.onerror = () => note('cannot read ' + file.name);
    reader.readAsText(file);
  }

  function note(text) {
    $('message').textContent = text;
  }

  // --- wiring --------------------------------------------------------------------------------

  function showPair(given, suggested) {
    controls.tier.value = '';
    controls.given.value = given;
    controls.suggested.value = suggested;
    controls.state.value = '';
    refilter();
    $('review').scrollIntoView({behavior: 'smooth'});
  }

  function reset() {
    controls.tier.value = '';
    controls.given.value = '';
    controls.suggested.value = '';
    controls.state.value = '';
    controls.review.value = '';
    controls.text.value = '';
    controls.sensitivity.value = controls.sensitivity.defaultValue;
    controls.sort.value = 'rank';
    refilter();
  }

  for (const el of [controls.tier, controls.given, controls.suggested, controls.state, controls.review,
    controls.text, controls.sensitivity, controls.sort]) {
    el.addEventListener('input', refilter);
    el.addEventListener('change', refilter);
  }
  controls.reset.addEventListener('click', reset);
  for (const button of document.querySelectorAll('button.cell')) {
    button.addEventListener('click', () => showPair(button.dataset.given,
      button.dataset.suggested));
  }
  grid.addEventListener('click', (e) => {
    const card = e.target.closest('.card');
    const item = card && byName.get(card.dataset.name);
    if (!item) return;
    setCursor(item);
    const act = e.target.closest('button[data-act]');
    if (!act) return;
    if (act.dataset.act === 'other') openPicker(item);
    else decide(item, decisionOf(item, act.dataset.act));
  });
  $('picker-q').addEventListener('input', filterPicker);
  $('picker-list').addEventListener('click', (e) => {
    const b = e.target.closest('button[data-class]');
    if (b) pick(b.dataset.class);
  });
  for (const id of ['picker', 'help']) {  // a click beside the box closes it
    $(id).addEventListener('click', (e) => {
      if (e.target === $(id)) (id === 'picker' ? closePicker() : toggleHelp(false));
    });
  }
  $('keys').addEventListener('click', () => toggleHelp(true));
  $('more-button').addEventListener('click', more);
  $('export').addEventListener('click', exportCsv);
  $('load').addEventListener('click', () => $('load-file').click());
  $('load-file').addEventListener('change', (e) => {
    if (e.target.files[0]) loadFile(e.target.files[0]);
    e.target.value = '';
  });
  const name = $('reviewer');
  try {
    name.value = localStorage.getItem(REVIEWER_STORE) || '';
  } catch (err) { /* storage off: the field starts empty */ }
  name.addEventListener('change', () => {
    try {
      localStorage.setItem(REVIEWER_STORE, reviewer());
    } catch (err) { /* the name is still used in this tab */ }
  });
  sentinel.observe($('more'));

  readStore();
  update();
  document.body.dataset.ready = '1';
})();
