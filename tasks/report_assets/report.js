'use strict';
// The review page's behaviour: filters, sort and the sensitivity slider over the cards.
// Everything it needs is in the page: each card's data-* attributes, written by
// tasks/report.py. It loads nothing (the page's Content-Security-Policy forbids it).
(() => {
  const $ = (id) => document.getElementById(id);

  const grid = $('grid');
  const controls = {
    given: $('f-given'),
    suggested: $('f-suggested'),
    state: $('f-state'),
    sort: $('f-sort'),
    text: $('f-text'),
    sensitivity: $('f-sens'),
    reset: $('f-reset'),
  };

  // One record per card, read once from its data attributes.
  const items = Array.from(grid.querySelectorAll('.card'), (el) => ({
    el,
    verdict: el.querySelector('.verdict'),
    rank: Number(el.dataset.rank),
    name: el.dataset.name,
    label: el.dataset.label,
    suggested: el.dataset.suggested,
    pct: Number(el.dataset.pct),
    quality: Number(el.dataset.quality),
    flagged: el.dataset.flagged === '1',
    // The sensitivity below which the image is relabelled (tasks.relabel.relabel_ceiling);
    // -1 when it never is.
    ceiling: Number(el.dataset.ceiling),
  }));

  // The relabel rule, as tasks.relabel.select_rows applies it.
  const wouldRelabel = (item, sensitivity) => sensitivity < item.ceiling;

  const byRank = (a, b) => a.rank - b.rank;
  const SORTERS = {
    rank: byRank,
    pct: (a, b) => b.pct - a.pct || byRank(a, b),
    quality: (a, b) => a.quality - b.quality || byRank(a, b),
    name: (a, b) => a.name.localeCompare(b.name),
  };

  function readFilters() {
    return {
      given: controls.given.value,
      suggested: controls.suggested.value,
      state: controls.state.value,
      text: controls.text.value.trim().toLowerCase(),
      sensitivity: Number(controls.sensitivity.value),
    };
  }

  function matches(item, f, relabel) {
    return (!f.given || item.label === f.given)
      && (!f.suggested || item.suggested === f.suggested)
      && (!f.state || (f.state === 'relabel') === relabel)
      && (!f.text || item.name.toLowerCase().includes(f.text));
  }

  function showVerdict(item, relabel) {
    item.el.dataset.relabel = relabel ? '1' : '0';
    item.el.classList.toggle('relabel', relabel);
    item.verdict.textContent = relabel ? 'would relabel'
      : item.flagged ? 'flagged, below threshold' : 'not flagged';
  }

  function update() {
    const f = readFilters();
    $('sens-value').textContent = f.sensitivity + '%';
    let shown = 0;
    let relabelled = 0;
    for (const item of items) {
      const relabel = wouldRelabel(item, f.sensitivity);
      showVerdict(item, relabel);
      if (relabel) relabelled++;
      const ok = matches(item, f, relabel);
      item.el.hidden = !ok;
      if (ok) shown++;
    }
    $('shown').textContent = 'showing ' + shown + ' of ' + items.length + ' · '
      + relabelled + ' would be relabelled at > ' + f.sensitivity + '%';
  }

  function sort() {
    const sorted = items.slice().sort(SORTERS[controls.sort.value] || SORTERS.rank);
    grid.append(...sorted.map((item) => item.el));
  }

  function showPair(given, suggested) {
    controls.given.value = given;
    controls.suggested.value = suggested;
    controls.state.value = '';
    update();
    $('review').scrollIntoView({behavior: 'smooth'});
  }

  function reset() {
    controls.given.value = '';
    controls.suggested.value = '';
    controls.state.value = '';
    controls.text.value = '';
    controls.sensitivity.value = controls.sensitivity.defaultValue;
    controls.sort.value = 'rank';
    sort();
    update();
  }

  for (const el of [controls.given, controls.suggested, controls.state, controls.text,
    controls.sensitivity]) {
    el.addEventListener('input', update);
    el.addEventListener('change', update);
  }
  controls.sort.addEventListener('change', sort);
  controls.reset.addEventListener('click', reset);
  for (const button of document.querySelectorAll('button.cell')) {
    button.addEventListener('click', () => showPair(button.dataset.given,
      button.dataset.suggested));
  }

  update();
  document.body.dataset.ready = '1';
})();
