// The operator's page: renders what the server holds (GET /api/state, then the /api/events stream),
// and sends the operator's changes with the token. No state of its own beyond the plot's points, the
// operator's name and token (kept in this browser's localStorage), and whether the pointer is on the
// review grid (which then holds still: the server's newer queue waits to be placed).
"use strict";

const HISTORY = 300;
const $ = (id) => document.getElementById(id);
let scores = [];          // [frame, score, decision], oldest first
let state = null;
let drawing = null;       // {id, region} while a defect region is being drawn
let pointing = false;     // the pointer is over the review grid: the grid holds still
let reviewItems = [];     // the review queue as the server last sent it, newest first

// -- token and operator ------------------------------------------------------------------------

(function rememberToken() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    localStorage.setItem("mrad-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  $("token").value = localStorage.getItem("mrad-token") || "";
  $("operator").value = localStorage.getItem("mrad-operator") || "";
  $("token").addEventListener("change", () => localStorage.setItem("mrad-token", $("token").value));
  $("operator").addEventListener("change", () => localStorage.setItem("mrad-operator", $("operator").value));
})();

function say(text, error) {
  $("message").textContent = $("message").title = text;  // one line on the page; the whole text on hover
  $("message").className = error ? "error" : "";
}

async function change(path, body) {
  localStorage.setItem("mrad-token", $("token").value);
  localStorage.setItem("mrad-operator", $("operator").value);
  say("working...");
  let response;
  try {
    response = await fetch(path, {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer " + $("token").value},
      body: JSON.stringify({operator: $("operator").value, ...body}),
    });
  } catch (err) {
    say("the server cannot be reached: " + err, true);
    return null;
  }
  const answer = await response.json().catch(() => ({error: "HTTP " + response.status}));
  if (!response.ok) {
    say((response.status === 403 ? "refused (403): " : response.status === 503 ? "not applied (503): " : "") +
        answer.error, true);
    return null;
  }
  render(answer.state);
  if (answer.done.warning) {  // applied, but its result is not in the audit log: the operator must know
    say(answer.done.warning, true);
    return null;
  }
  return answer.done;
}

// -- live state --------------------------------------------------------------------------------

function fmt(value, digits) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function render(s) {
  state = s;
  $("status").textContent = s.running ? "running" : "stopped";
  $("status").className = "badge " + (s.running ? "running" : "stopped");
  $("frames").textContent = s.counts.frames;
  $("defects").textContent = s.counts.anomalous;
  $("errors").textContent = s.counts.errors;
  $("fps").textContent = fmt(s.fps, 1);
  $("p50").textContent = s.latency_p50_ms === undefined ? "-" : fmt(s.latency_p50_ms, 1) + " ms";
  $("p95").textContent = s.latency_p95_ms === undefined ? "-" : fmt(s.latency_p95_ms, 1) + " ms";
  $("threshold").textContent = fmt(s.threshold.value, 4);
  $("enrolled-good").textContent = s.enrollment.good;
  $("enrolled-defects").textContent = s.enrollment.defects;
  $("enrollment-version").textContent = s.enrollment.version === null ? "none" : "v" + s.enrollment.version;
  $("undo").disabled = s.enrollment.version === null;
  const note = $("threshold-note");
  note.textContent = "threshold from " + s.threshold.origin +
    (s.threshold.stale ? ". The enrollment changed since it was measured: recalibrate." : "");
  note.className = s.threshold.stale ? "stale" : "";
  renderRecipes(s);
  renderSources(s.sources);
  renderReview(s.review);
  renderList($("audit"), s.audit, auditText);
  renderList($("events"), s.events.slice().reverse(), (e) => `${e.timestamp} ${e.event} ${e.source || e.sink || ""}`);
  drawPlot();
}

function renderRecipes(s) {
  $("recipe-active").textContent = s.recipe.active;
  const choice = $("recipe-choice");
  const names = s.recipe.recipes.join("\n");
  if (choice.dataset.names !== names) {  // rebuilt only when the station's recipes differ: a choice stays made
    choice.dataset.names = names;
    choice.textContent = "";
    for (const name of s.recipe.recipes) choice.append(new Option(name, name));
  }
  if (document.activeElement !== choice) choice.value = s.recipe.active;
  const body = $("recipe-counts").querySelector("tbody");
  body.textContent = "";
  for (const [name, counts] of Object.entries(s.recipes || {})) {
    const row = body.insertRow();
    for (const text of [name, counts.frames, counts.anomalous]) row.insertCell().textContent = text;
  }
}

function renderSources(sources) {
  const box = $("sources");
  for (const src of sources) {
    let tile = box.querySelector(`[data-key="${CSS.escape(src.key)}"]`);
    if (!tile) {
      tile = document.createElement("figure");
      tile.className = "source";
      tile.dataset.key = src.key;
      tile.innerHTML = '<img class="heatmap" alt="latest frame with its heatmap"><figcaption class="caption">' +
        '<span class="name"></span><span class="frame"></span><span class="score"></span><span class="health"></span></figcaption>';
      box.appendChild(tile);
    }
    label(tile.querySelector(".name"), src.key);  // the name given (--name), else the path, URL or device id as typed
    tile.querySelector(".health").textContent = src.health === "ok" ? "" : "camera " + src.health;
    tile.querySelector(".health").className = "health " + (src.health === "ok" ? "" : "anomalous");
    const latest = src.latest;
    if (!latest) continue;
    tile.querySelector(".frame").textContent = "frame " + latest.frame;
    const score = tile.querySelector(".score");
    score.textContent = fmt(latest.score, 4) + (latest.decision ? " " + latest.decision : "");
    score.className = "score " + (latest.decision || "");
    const img = tile.querySelector("img");
    // one picture in flight per source: a slow link shows fewer frames, never a backlog
    if (img.dataset.id !== String(latest.id) && img.dataset.loading !== "1") {
      img.dataset.loading = "1";
      img.onload = img.onerror = () => { img.dataset.loading = "0"; };
      img.dataset.id = latest.id;
      img.src = `/api/latest.jpg?source=${encodeURIComponent(src.key)}&seen=${latest.id}`;
    }
  }
}

function label(element, name, whole = name) {
  // a name too long for its room is cut at its start ("…checker/test"): a path's end says most; whole on hover
  if (element.textContent === name && element.title === whole) return;
  const text = document.createElement("bdi");
  text.textContent = name;
  element.title = whole;
  element.replaceChildren(text);
}

// -- the review grid: a card never moves under the operator's pointer --------------------------------
// While the pointer is over the grid, or a region is being drawn, the grid holds still: new cards wait
// ("N new"), cards whose frame left the server's queue are greyed in place; all is placed when the
// pointer leaves. Otherwise the grid shows the queue as the server holds it, newest first, each card
// kept by id (moved, never rebuilt: its picture is not fetched again).

function reviewHeld() {
  return pointing || drawing !== null;
}

function renderReview(items) {
  reviewItems = items;
  const box = $("review");
  const cards = new Map([...box.children].map((card) => [card.dataset.id, card]));
  for (const item of items) {
    const card = cards.get(String(item.id));
    if (card) showVerdict(card, item);
  }
  if (reviewHeld()) {
    const queued = new Set(items.map((item) => String(item.id)));
    for (const [id, card] of cards) if (!queued.has(id)) leftQueue(card);
    showWaiting(items.filter((item) => !cards.has(String(item.id))).length);
    return;
  }
  placeReview(box, cards, items);
  showWaiting(0);
}

function placeReview(box, cards, items) {
  const wanted = new Set(items.map((item) => String(item.id)));
  for (const [id, card] of cards) if (!wanted.has(id)) card.remove();
  items.forEach((item, i) => {
    let card = cards.get(String(item.id));
    if (!card) {
      card = reviewCard(item);
      showVerdict(card, item);
    }
    if (box.children[i] !== card) box.insertBefore(card, box.children[i] || null);
  });
}

function leftQueue(card) {
  // its frame is no longer held: a click could only be refused, so there is none to make
  if (card.classList.contains("gone")) return;
  card.classList.add("gone");
  for (const b of card.querySelectorAll("button")) b.disabled = true;
  card.title = "this frame left the review queue";
}

function showWaiting(count) {
  const badge = $("review-new");
  badge.textContent = count + " new";
  badge.dataset.count = count;
  badge.style.visibility = count ? "visible" : "hidden";  // its room is kept: nothing below it shifts
}

function reviewCard(item) {
  const card = document.createElement("div");
  card.className = "item";
  card.dataset.id = item.id;
  card.innerHTML = `<img src="/api/frames/${item.id}.jpg" alt="flagged frame ${item.frame}">
    <div class="meta"><div class="from"></div><div class="file"></div>
      <div>frame ${item.frame} · <span class="score">${fmt(item.score, 4)}</span> · ${item.flag}</div>
      <div class="recipe"></div></div>
    <div class="judge"><div class="verdict"></div><div class="buttons"></div></div>`;
  // which source (its tile's label), which file of it (a folder's, say: with its sub-folder), which recipe
  label(card.querySelector(".from"), item.name);
  label(card.querySelector(".file"), item.source !== item.name ? item.source.split("/").slice(-2).join("/") : "\u00a0",
        item.source);
  card.querySelector(".recipe").textContent = "recipe " + (item.recipe || "-");
  return card;
}

function showVerdict(card, item) {
  const verdict = item.verdict;
  const key = JSON.stringify(verdict || null);
  if (card.dataset.verdict === key) return;
  card.dataset.verdict = key;
  const box = card.querySelector(".verdict");
  const buttons = card.querySelector(".buttons");
  buttons.textContent = "";  // a judged frame has no buttons; one not judged has its three
  if (!verdict) {
    box.textContent = "";
    delete box.dataset.label;
    buttons.append(button("good", "good", () => enroll(item.id, "normal")),
                   button("defect", "defect", () => enroll(item.id, "defect")),
                   button("defect region…", "defect draw", () => startDrawing(item.id)));
    return;
  }
  box.textContent = box.title = `${verdict.label === "normal" ? "good" : "defect"} (${verdict.operator}): ` +
    `score ${fmt(verdict.score_before, 4)} → ${fmt(verdict.score_after, 4)}` + (verdict.undone_by ? ", undone" : "");
  box.dataset.label = verdict.label;
  box.dataset.after = verdict.score_after;
}

function button(text, cls, onclick) {
  const b = document.createElement("button");
  b.textContent = text;
  b.className = cls;
  b.onclick = onclick;
  return b;
}

// Each change is two entries: what was asked (on disk before it was applied), then its result ("of" it).
function auditText(e) {
  if (e.result) return `${e.time} ${e.operator}: ${e.action} ${e.result}` + (e.result === "failed" ? `: ${e.error}` : resultText(e));
  const from = e.name && e.name !== e.source ? `${e.name} (${e.source})` : e.source;
  const what = e.action === "enroll" ? `${e.label} from ${from} frame ${e.frame} (score ${fmt(e.score_before, 4)})`
    : e.action === "undo" ? `of v${e.version_before}`
    : e.action === "recipe" ? `${e.recipe_before} → ${e.recipe}`
    : e.action === "recalibrate" ? `from ${fmt(e.threshold_before, 4)} on ${e.parts} good parts`
    : `threshold ${fmt(e.threshold_before, 4)} → ${fmt(e.threshold, 4)}`;
  return `${e.time} ${e.operator}: ${e.action} ${what}` + (e.recipe && e.action !== "recipe" ? ` (${e.recipe})` : "");
}

function resultText(e) {
  return e.action === "enroll" ? `: v${e.version}, score → ${fmt(e.score_after, 4)}`
    : e.action === "undo" ? `: ${e.version === null ? "none" : "v" + e.version} in use`
    : e.action === "recalibrate" ? `: threshold ${fmt(e.threshold, 4)}` : "";
}

function renderList(list, entries, text) {
  list.textContent = "";
  for (const entry of entries) {
    const li = document.createElement("li");
    li.textContent = text(entry);
    list.appendChild(li);
  }
}

function drawPlot() {
  const canvas = $("plot"), ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 4;
  ctx.clearRect(0, 0, w, h);
  const threshold = state && state.threshold.value;
  const values = scores.map((s) => s[1]).concat(threshold === null || threshold === undefined ? [] : [threshold]);
  if (!values.length) return;
  let low = Math.min(...values), high = Math.max(...values);
  if (high - low < 1e-9) { low -= 0.5; high += 0.5; }
  const margin = (high - low) * 0.08;
  low -= margin; high += margin;
  const y = (v) => h - pad - (v - low) / (high - low) * (h - 2 * pad);
  const x = (i) => pad + i * (w - 2 * pad) / Math.max(HISTORY - 1, 1);
  scores.forEach((s, i) => {
    ctx.fillStyle = s[2] === "anomalous" ? "#c62828" : "#1565c0";
    ctx.fillRect(x(i) - 1.5, y(s[1]) - 1.5, 3, 3);
  });
  if (threshold !== null && threshold !== undefined) {
    ctx.strokeStyle = "#d84315";
    ctx.setLineDash([6, 4]);
    ctx.beginPath();
    ctx.moveTo(0, y(threshold));
    ctx.lineTo(w, y(threshold));
    ctx.stroke();
    ctx.setLineDash([]);
  }
  ctx.fillStyle = "#6b7385";
  ctx.font = "11px system-ui";
  ctx.fillText(high.toFixed(3), 4, 12);
  ctx.fillText(low.toFixed(3), 4, h - 6);
}

function connect() {
  const stream = new EventSource("/api/events");
  stream.addEventListener("state", (e) => {
    const s = JSON.parse(e.data);
    scores = s.scores || [];
    render(s);
  });
  stream.addEventListener("update", (e) => {
    const s = JSON.parse(e.data);
    for (const m of s["new"]) if (m.score !== undefined) scores.push([m.frame, m.score, m.decision]);
    scores = scores.slice(-HISTORY);
    render(s);
  });
  stream.onerror = () => {
    $("status").textContent = "reconnecting";
    $("status").className = "badge lost";
  };
}

// -- changes -----------------------------------------------------------------------------------

async function enroll(id, label, region) {
  const done = await change(`/api/frames/${id}/enroll`, region ? {label, region} : {label});
  if (done) say(`enrolled as ${label === "normal" ? "good" : "defect"} (v${done.version}): ` +
                `this frame now scores ${fmt(done.score_after, 4)} (was ${fmt(done.score_before, 4)})`);
}

function startDrawing(id) {
  drawing = {id, region: null};  // the review grid holds still until it is done
  $("inspect").hidden = false;
  $("inspect-image").src = `/api/frames/${id}.jpg?show=image`;
  const canvas = $("inspect-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

(function regionDrawing() {
  const canvas = $("inspect-canvas");
  let start = null;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [Math.min(Math.max((e.clientX - r.left) / r.width, 0), 1), Math.min(Math.max((e.clientY - r.top) / r.height, 0), 1)];
  };
  canvas.addEventListener("mousedown", (e) => { start = at(e); });
  canvas.addEventListener("mousemove", (e) => {
    if (!start || !drawing) return;
    const end = at(e);
    drawing.region = [Math.min(start[0], end[0]), Math.min(start[1], end[1]), Math.max(start[0], end[0]), Math.max(start[1], end[1])];
    canvas.width = canvas.clientWidth; canvas.height = canvas.clientHeight;
    const ctx = canvas.getContext("2d"), [x0, y0, x1, y1] = drawing.region;
    ctx.strokeStyle = "#ff1744"; ctx.lineWidth = 2;
    ctx.strokeRect(x0 * canvas.width, y0 * canvas.height, (x1 - x0) * canvas.width, (y1 - y0) * canvas.height);
  });
  window.addEventListener("mouseup", () => { start = null; });
  const done = () => {
    $("inspect").hidden = true;
    drawing = null;
    renderReview(reviewItems);  // what waited while the region was drawn
  };
  $("inspect-enroll").onclick = async () => {
    if (!drawing || !drawing.region) { say("drag over the defect first", true); return; }
    const {id, region} = drawing;
    done();
    await enroll(id, "defect", region);
  };
  $("inspect-cancel").onclick = done;
})();

(function reviewHoldsStill() {
  const box = $("review");
  box.addEventListener("pointerenter", () => { pointing = true; });
  box.addEventListener("pointerleave", () => {
    pointing = false;
    renderReview(reviewItems);
  });
})();

$("undo").onclick = async () => {
  const done = await change("/api/undo", {});
  if (done) say(`undone: enrollment ${done.version === null ? "none" : "v" + done.version} in use`);
};
$("recalibrate").onclick = async () => {
  const done = await change("/api/threshold", {recalibrate: true, quantile: Number($("quantile").value)});
  if (done) say(`threshold ${fmt(done.threshold_before, 4)} → ${fmt(done.threshold, 4)} on ${done.parts} good parts`);
};
$("change-over").onclick = async () => {
  const done = await change("/api/recipe", {recipe: $("recipe-choice").value});
  if (done) say(`recipe ${done.recipe_before} → ${done.recipe}, from the next frame`);
};
$("set-threshold").onclick = async () => {
  const done = await change("/api/threshold", {value: Number($("threshold-value").value)});
  if (done) say(`threshold ${fmt(done.threshold_before, 4)} → ${fmt(done.threshold, 4)}`);
};

fetch("/api/state").then((r) => r.json()).then((s) => { scores = s.scores || []; render(s); }).catch(() => {});
connect();
