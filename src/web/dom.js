// DOM helpers shared by the run page (run.js) and the demo page (demo.js); values go in as text or attributes,
// never as HTML.

/** el('td', {class: 'num'}, 'text', child, ...): attributes set as attributes, children as text or nodes. */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === 'dataset') Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) if (c != null && c !== false) e.append(c instanceof Node ? c : String(c));
  return e;
}
