// spotline live view: the page's script (producer/static/live.html).
"use strict";
const KEY_ITEM = "spotline-live-key";
let key = sessionStorage.getItem(KEY_ITEM);
if (location.hash.startsWith("#key=")) {
  key = decodeURIComponent(location.hash.slice(5));
  sessionStorage.setItem(KEY_ITEM, key);
  history.replaceState(null, "", location.pathname);  // keep the key out of the address bar
}
const cards = new Map();

function el(tag, attrs = {}, text = "") {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text) e.textContent = text;
  return e;
}

function card(source) {
  let c = cards.get(source);
  if (c) return c;
  const root = el("section", {class: "card", "data-source": source});
  const h = el("h2");
  h.append(el("span", {class: "name"}, source), el("span", {class: "figures"}));
  const view = el("div", {class: "view"});
  const img = el("img", {alt: "latest frame of " + source});
  view.append(img);
  root.append(h, view, el("div", {class: "nobox"}), el("div", {class: "error"}), el("table"));
  document.getElementById("sources").append(root);
  document.getElementById("empty").hidden = true;
  c = {root, img, view, pending: null};
  // Boxes are drawn when the image they belong to has loaded, never over another frame.
  img.addEventListener("load", () => { if (c.pending) draw(c, c.pending); });
  cards.set(source, c);
  return c;
}

function fmt(x, digits = 1) { return x == null ? "-" : Number(x).toFixed(digits); }

function draw(c, s) {
  c.pending = null;
  const r = s.result;
  c.view.querySelectorAll(".box").forEach((b) => b.remove());
  c.root.dataset.frame = s.frame_id;
  c.size = r.image_size;  // the source's frame size: ask's boxes are in its pixels
  const [w, h] = r.image_size;
  let missing = 0;
  for (const item of r.results) {
    if (!item.bbox) { missing++; continue; }  // track mode: not in view
    const [left, top, bw, bh] = item.bbox;
    if (!(bw > 0 && bh > 0) || !(w > 0 && h > 0)) { missing++; continue; }
    const tracked = item.track_id != null && item.track_id >= 0;  // -1: no track
    const box = el("div", {class: "box" + (r.fallback ? " low" : ""), "data-caption": item.caption});
    if (tracked) box.dataset.track = item.track_id;
    Object.assign(box.style, {left: (100 * left / w) + "%", top: (100 * top / h) + "%",
                              width: (100 * bw / w) + "%", height: (100 * bh / h) + "%"});
    const label = item.caption + " " + (item.score == null ? "" : item.score.toFixed(2)) +
                  (tracked ? " #" + item.track_id : "");
    const tag = el("span", {}, label);
    if (left + bw / 2 > w / 2) Object.assign(tag.style, {left: "auto", right: "-2px"});  // stay inside
    box.append(tag);
    c.view.append(box);
  }
  c.root.querySelector(".nobox").textContent =
    missing ? missing + " caption(s) without a box in this frame" : "";
  c.root.querySelector(".error").textContent = r.error ? "error: " + r.error : "";
  const table = c.root.querySelector("table");
  table.replaceChildren();
  const head = el("tr");
  head.append(el("th", {}, "stage"), el("th", {}, "queued ms"), el("th", {}, "work ms"));
  table.append(head);
  for (const st of s.stages) {
    const tr = el("tr");
    tr.append(el("td", {}, st.stage), el("td", {}, fmt(st.queue_ms)), el("td", {}, fmt(st.work_ms)));
    table.append(tr);
  }
  const total = el("tr", {class: "total"});
  total.append(el("td", {}, "capture \u2192 result"), el("td"), el("td", {}, fmt(s.latency_ms)));
  table.append(total);
}

function render(s) {
  const c = card(s.source_id);
  c.root.querySelector(".figures").textContent =
    fmt(s.fps) + " results/s \u00b7 " + s.results + " results \u00b7 " + s.dropped + " dropped" +
    (s.rejected ? " \u00b7 " + s.rejected + " rejected" : "") +
    (s.errors ? " \u00b7 " + s.errors + " errors" : "");
  if (!s.frame_id || s.frame_id === c.root.dataset.frame || !s.image_data) return;
  c.pending = s;
  c.img.src = s.image_data;
}

function setStatus(cls, text) {
  const status = document.getElementById("status");
  status.className = cls;
  status.textContent = text;
}

function dispatch(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (event === "source" && data.length) render(JSON.parse(data.join("\n")));
}

function askKey(message) {
  const form = document.getElementById("keyform");
  form.hidden = false;
  document.getElementById("keymsg").textContent = message;
  setStatus("down", "API key needed");
}

// Server-sent events read with fetch (so the API key can go in a header), reconnecting.
async function stream() {
  const headers = key ? {"X-API-Key": key} : {};
  const resp = await fetch("/live/events", {headers, cache: "no-store"});
  if (resp.status === 401 || resp.status === 403) {  // no key, a wrong one, or no read scope
    const body = await resp.json().catch(() => ({}));
    askKey(body.error || body.detail || "API key needed");
    return false;
  }
  if (!resp.ok) throw new Error("HTTP " + resp.status);
  setStatus("ok", "live");
  document.getElementById("keyform").hidden = true;
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += value;
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      dispatch(buf.slice(0, end));
      buf = buf.slice(end + 2);
    }
  }
  return true;
}

async function connect() {
  let delay = 500;
  for (;;) {
    try {
      if (await stream() === false) return;  // waits for a key
      delay = 500;
    } catch (e) {
      console.debug("live stream:", e);
    }
    setStatus("down", "reconnecting");
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 5000);
  }
}

// Ask the past (docs/ask.md): a caption over the shown sources' last minutes; each matching
// track drawn on a stored preview of one of its frames where one is still kept.
function headers() { return key ? {"X-API-Key": key} : {}; }

function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = reject;
    reader.readAsDataURL(blob);  // data: URLs only: the page's CSP allows no blob: images
  });
}

async function preview(m) {
  // the newest of the track's frames whose preview is kept (a few tries, newest first)
  for (let i = m.frame_ids.length - 1, tries = 0; i >= 0 && tries < 8; i--) {
    const fid = m.frame_ids[i];
    if (!fid) continue;
    tries++;
    const url = "/live/frames/" + encodeURIComponent(m.source_id) + "/" +
                encodeURIComponent(fid) + ".jpg";
    const resp = await fetch(url, {headers: headers(), cache: "no-store"});
    if (resp.ok) return {src: await dataUrl(await resp.blob()), box: m.boxes[i]};
  }
  return null;
}

function when(t) { return new Date(t * 1000).toLocaleTimeString(); }

async function showMatch(m) {
  const root = el("section", {class: "card", "data-track": m.source_id + "#" + m.track_id});
  const prob = m.probability == null ? "" : " p=" + m.probability.toFixed(2);
  root.append(el("h2", {}, m.source_id + " track #" + m.track_id + prob),
              el("p", {}, "seen " + when(m.first_seen) + " – " + when(m.last_seen)));
  document.getElementById("answers").append(root);
  const shown = await preview(m);
  if (!shown) { root.append(el("p", {}, "no stored preview of its frames")); return; }
  const view = el("div", {class: "view"});
  const img = el("img", {alt: "track " + m.track_id + " of " + m.source_id});
  view.append(img);
  root.append(view);
  img.addEventListener("load", () => {
    const c = cards.get(m.source_id);
    const [w, h] = c && c.size ? c.size : [img.naturalWidth, img.naturalHeight];
    const [, , x1, y1, x2, y2] = shown.box;
    const box = el("div", {class: "box"});
    Object.assign(box.style, {left: (100 * x1 / w) + "%", top: (100 * y1 / h) + "%",
                              width: (100 * (x2 - x1) / w) + "%", height: (100 * (y2 - y1) / h) + "%"});
    box.append(el("span", {}, "#" + m.track_id));
    view.append(box);
  });
  img.src = shown.src;
}

async function ask(caption, since) {
  const msg = document.getElementById("askmsg");
  const answers = document.getElementById("answers");
  answers.replaceChildren();
  const params = new URLSearchParams({caption, since});
  for (const source of cards.keys()) params.append("source", source);
  msg.textContent = "asking…";
  const resp = await fetch("/ask?" + params, {headers: headers(), cache: "no-store"});
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) { msg.textContent = body.error || body.detail || "HTTP " + resp.status; return; }
  msg.textContent = body.seen ? body.matches.length + " track(s), best first"
                              : "not seen in the last " + since;
  for (const m of body.matches) await showMatch(m);
}

document.getElementById("askform").addEventListener("submit", (e) => {
  e.preventDefault();
  const caption = document.getElementById("caption").value.trim();
  if (caption) ask(caption, document.getElementById("since").value).catch((err) => {
    document.getElementById("askmsg").textContent = "ask failed: " + err;
  });
});

document.getElementById("keyform").addEventListener("submit", (e) => {
  e.preventDefault();
  key = document.getElementById("key").value.trim();
  sessionStorage.setItem(KEY_ITEM, key);
  connect();
});
connect();
