// The ocula page: send a photo, a camera frame or a drawing to /v1/predict and show the answer. No framework and
// no build step; everything it loads comes from the server that sent it.
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = ["#00dc50", "#ffd200", "#00a0ff", "#ff3c3c", "#c800ff", "#00ffff", "#ff8200", "#ff0096"];
let models = [];
let stream = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

function table(headers, rows) {
  const head = el("tr", {}, ...headers.map((h) => el("th", { scope: "col" }, h)));
  return el("table", {}, el("thead", {}, head),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {}, c))))));
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

function currentModel() {
  return models.find((m) => m.name === $("model").value);
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    const body = await response.json();
    models = body.models;
    for (const m of models) $("model").append(el("option", { value: m.name }, `${m.name} (${m.task})`));
    $("model").value = body.default;
    describeModel();
  } catch (e) {
    showError("Could not reach the ocula server: " + e.message);
  }
}

function describeModel() {
  const m = currentModel();
  if (!m) return;
  $("model-about").textContent = `${m.task}, ${m.classes.length} classes, runs on ${m.runtime}`;
  // The drawing pad makes sense for a classifier of drawn shapes (digits), not for smears.
  $("draw-panel").hidden = m.task !== "classify";
}

async function predict(blob, source, pictureUrl) {
  $("error").hidden = true;
  $("status").textContent = `Reading ${source}...`;
  const form = new FormData();
  form.append("image", blob, "image");
  form.append("model", $("model").value);
  let body;
  try {
    const response = await fetch("/v1/predict", { method: "POST", body: form });
    body = await response.json();
    if (!response.ok) {
      const retry = response.headers.get("Retry-After");
      showError(body.error + (retry ? ` (try again in ${retry} s)` : ""));
      return;
    }
  } catch (e) {
    showError("The server did not answer: " + e.message);
    return;
  }
  $("status").textContent = `${source}: answered by ${body.model} (${body.runtime}) in ${body.milliseconds} ms`;
  const answer = $("answer");
  answer.replaceChildren();
  answer.dataset.source = source.startsWith("the drawing") ? "drawing" : "photo";
  if (body.task === "classify") showClass(answer, body);
  else if (body.task === "segment") showMask(answer, body, pictureUrl);
  else if (body.task === "detect") showBoxes(answer, body, pictureUrl);
  else answer.append(el("pre", {}, JSON.stringify(body, null, 2)));
  $("answer-panel").scrollIntoView({ block: "nearest" });  // on a phone the answer is below the inputs
}

function showClass(answer, body) {
  const top = Object.entries(body.probabilities).sort((a, b) => b[1] - a[1]);
  const bar = (p) => {  // sized through the CSSOM: the page's Content-Security-Policy forbids style attributes
    const span = el("span", { class: "bar", "aria-hidden": "true" });
    span.style.width = `${Math.round(p * 120)}px`;
    return span;
  };
  const rows = top.map(([name, p]) => [name, p.toFixed(3), bar(p)]);
  const verdict = el("div", {}, el("p", { class: "label", id: "label" }, body.class),
    el("p", {}, `probability ${body.probability.toFixed(3)}`), table(["class", "probability", ""], rows));
  const stages = el("div", { class: "stages" }, ...(body.stages || []).map((s) =>
    el("figure", {}, el("img", { src: s.png, alt: s.name }), el("figcaption", {}, s.name))));
  answer.append(el("div", { class: "results" }, verdict,
    el("div", {}, el("h3", {}, "How the image was prepared"), stages)));
}

function plural(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

function countsTable(counts) {
  return table(["class", "count"], Object.entries(counts).map(([k, v]) => [k, String(v)]));
}

function showMask(answer, body, pictureUrl) {
  const picture = el("div", { class: "picture" },
    el("img", { src: pictureUrl, alt: "the image" }),
    el("img", { src: body.mask_png, alt: "the predicted mask", class: "overlay" }));
  const columns = body.cells.length ? Object.keys(body.cells[0]) : ["id"];
  const cells = body.cells.slice(0, 200).map((c) => columns.map((k) => String(c[k])));
  // As `ocula predict` says it: a blood model took the image to be at its training images' scale.
  const scale = body.scale_assumed ? [el("p", { id: "scale" }, `scale unknown: assumed white cells `
    + `${body.cell_diameter_px.toFixed(1)} px across, as in the training images`)] : [];
  answer.append(el("div", { class: "results wide" }, picture,
    el("div", {}, el("p", { class: "label", id: "label" }, plural(body.count, "cell")),
      el("p", {}, `foreground ${(body.foreground * 100).toFixed(1)}% of the image`), ...scale,
      countsTable(body.counts),
      el("div", { class: "scroll" }, table(columns, cells)))));
}

function showBoxes(answer, body, pictureUrl) {
  const canvas = el("canvas", { width: body.width, height: body.height, role: "img",
    "aria-label": `${body.detections.length} boxes drawn on the image` });
  const classes = Object.keys(body.counts);
  const image = new Image();
  image.onload = () => {
    const g = canvas.getContext("2d");
    g.drawImage(image, 0, 0, body.width, body.height);
    g.lineWidth = Math.max(2, body.width / 300);
    g.font = `${Math.max(12, body.width / 50)}px sans-serif`;
    for (const d of body.detections) {
      const [x0, y0, x1, y1] = d.box;
      g.strokeStyle = g.fillStyle = COLOURS[classes.indexOf(d.class) % COLOURS.length];
      g.strokeRect(x0, y0, x1 - x0, y1 - y0);
      g.fillText(`${d.class} ${d.score.toFixed(2)}`, x0 + 2, Math.max(12, y0 - 3));
    }
  };
  image.src = pictureUrl;
  const total = Object.values(body.counts).reduce((a, b) => a + b, 0);
  answer.append(el("div", { class: "results wide" }, el("div", { class: "picture" }, canvas),
    el("div", {}, el("p", { class: "label", id: "label" }, plural(total, "object")), countsTable(body.counts))));
}

function sendFile(file) {
  if (!file) return;
  predict(file, `the file ${file.name}`, URL.createObjectURL(file));
}

// --- upload and drag-and-drop ---
$("file").addEventListener("change", () => sendFile($("file").files[0]));
const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
});
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  sendFile(e.dataTransfer.files[0]);
});

// --- camera: getUserMedia where the browser allows it (https or localhost), else the file input's capture ---
$("camera-start").addEventListener("click", async () => {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("This browser gives no camera to this page (it needs https or localhost); use 'Choose or take a photo'.");
    return;
  }
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
  } catch (e) {
    showError("No camera: " + e.message + ". Use 'Choose or take a photo' instead.");
    return;
  }
  $("video").srcObject = stream;
  $("camera").hidden = false;
  $("camera-shoot").focus();
});

function stopCamera() {
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null;
  $("camera").hidden = true;
}

$("camera-stop").addEventListener("click", stopCamera);
$("camera-shoot").addEventListener("click", () => {
  const video = $("video");
  const frame = el("canvas", { width: video.videoWidth, height: video.videoHeight });
  frame.getContext("2d").drawImage(video, 0, 0);
  frame.toBlob((blob) => predict(blob, "the camera photo", URL.createObjectURL(blob)), "image/jpeg", 0.92);
  stopCamera();
});

// --- the drawing pad: dark ink on white paper, like the photos the digit models read ---
const pad = $("pad");
const pen = pad.getContext("2d");
let drawing = false;

function clearPad() {
  pen.fillStyle = "#fff";
  pen.fillRect(0, 0, pad.width, pad.height);
}

function point(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}

pad.addEventListener("pointerdown", (e) => {
  drawing = true;
  pad.setPointerCapture(e.pointerId);
  pen.beginPath();
  pen.moveTo(...point(e));
});
pad.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  pen.lineWidth = 18;
  pen.lineCap = pen.lineJoin = "round";
  pen.strokeStyle = "#111";
  pen.lineTo(...point(e));
  pen.stroke();
});
pad.addEventListener("pointerup", () => { drawing = false; });
$("pad-clear").addEventListener("click", clearPad);
$("pad-read").addEventListener("click", () =>
  pad.toBlob((blob) => predict(blob, "the drawing", URL.createObjectURL(blob)), "image/png"));

$("model").addEventListener("change", describeModel);
clearPad();
loadModels();
