// The clinician's page: one request per file, so one bad file never loses the others.
// Everything user-provided is written with textContent, never as HTML.
"use strict";

(() => {
  const ACCEPTED = /\.(tiff?|png|jpe?g)$/i;
  const PARALLEL = 2;  // uploads in flight; the server runs inference one batch at a time

  const el = (id) => document.getElementById(id);
  const state = {
    maxUploadBytes: 20 * 1024 * 1024,
    presenceThreshold: null,  // the calibrated decision threshold, from /healthz
    minArea: 0,               // the calibrated minimum mask area (px), from /healthz
    margin: 0,                // presence this close to the threshold is "Uncertain"
    ready: false,
    queue: [],      // {file, card} waiting to be sent
    active: 0,
    results: [],    // {card, name, rle} in the order added
  };

  // --- server status -------------------------------------------------------------------

  function setStatus(kind, text) {
    const box = el("status");
    box.className = `status status-${kind}`;
    el("status-text").textContent = text;
  }

  async function pollHealth() {
    try {
      const response = await fetch("/healthz", {cache: "no-store"});
      const body = await response.json();
      if (body.max_upload_bytes) {
        state.maxUploadBytes = body.max_upload_bytes;
        el("limit-mb").textContent = formatMb(body.max_upload_bytes);
      }
      if (response.ok && body.status === "ready") {
        state.ready = true;
        const threshold = body.calibration && body.calibration.presence_threshold;
        state.presenceThreshold = typeof threshold === "number" ? threshold : null;
        const minArea = body.calibration && body.calibration.min_area;
        state.minArea = typeof minArea === "number" ? minArea : 0;
        state.margin = typeof body.uncertain_margin === "number" ? body.uncertain_margin : 0;
        showModel(body.model || {}, body);
        setStatus("ready", "Model ready");
        pump();
        return;
      }
      if (body.status === "error") {
        setStatus("error", "Model failed to load: " + (body.error || "see server log"));
        failQueued("The model failed to load on the server.");
        return;
      }
      setStatus("loading", "Loading model…");
    } catch (err) {
      setStatus("error", "Server not reachable");
    }
    setTimeout(pollHealth, 1000);
  }

  // Which model answers, and how far to trust it: named in the header.
  function showModel(m, health) {
    const score = (x) => (typeof x === "number" ? x.toFixed(3) : "n/a");
    const runs = (health.workdirs || []).length;
    const parts = [`Model ${m.name || "?"}` + (m.folds ? ` (ensemble of ${m.folds})`
                   : runs > 1 ? ` (first of an ensemble of ${runs})` : "")];
    if (typeof m.step === "number") parts.push(`checkpoint step ${m.step}`);
    if (typeof m.kaggle_score === "number" || typeof m.nerve_dice === "number") {
      parts.push(`validation Kaggle score ${score(m.kaggle_score)}`,
                 `nerve-frame Dice ${score(m.nerve_dice)}`);
    } else {
      parts.push("no validation scores recorded");
    }
    parts.push(m.calibrated ? `thresholds calibrated ${m.calibrated_at}`
                            : "thresholds not calibrated (defaults)");
    if (health.classifier_workdir) parts.push(`presence decided by ${health.classifier_workdir}`);
    const line = el("model-line");
    line.textContent = parts.join(" · ");
    line.title = m.scores_source ? `Scores: ${m.scores_source}` : (m.error || "");
    line.hidden = false;
  }

  // --- adding files ----------------------------------------------------------------------

  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    el("toolbar").hidden = false;
    for (const file of files) {
      const card = makeCard(file.name);
      el("results").appendChild(card);
      if (!ACCEPTED.test(file.name) && !(file.type || "").startsWith("image/")) {
        showError(card, `${file.name}: not a TIFF, PNG or JPEG file.`);
      } else if (file.size > state.maxUploadBytes) {
        showError(card, `${file.name}: file too large (${formatMb(file.size)} MB); ` +
                  `the limit is ${formatMb(state.maxUploadBytes)} MB.`);
      } else {
        state.queue.push({file, card});
      }
    }
    updateSummary();
    pump();
  }

  function pump() {
    while (state.ready && state.active < PARALLEL && state.queue.length) {
      const job = state.queue.shift();
      state.active += 1;
      upload(job).finally(() => {
        state.active -= 1;
        updateSummary();
        pump();
      });
    }
  }

  function failQueued(message) {
    for (const job of state.queue.splice(0)) showError(job.card, `${job.file.name}: ${message}`);
    updateSummary();
  }

  async function upload({file, card}) {
    const form = new FormData();
    form.append("file", file, file.name);
    let response, body;
    try {
      response = await fetch("/api/segment", {method: "POST", body: form});
    } catch (err) {
      showError(card, `${file.name}: the server could not be reached (${err.message}).`);
      return;
    }
    try {
      body = await response.json();
    } catch (err) {
      body = {error: `unexpected answer from the server (HTTP ${response.status})`};
    }
    if (!response.ok) {
      showError(card, body.error || `HTTP ${response.status}`);
      return;
    }
    try {
      await showResult(card, body);
    } catch (err) {
      showError(card, `${file.name}: the result could not be shown (${err.message}).`);
    }
  }

  // --- cards -----------------------------------------------------------------------------

  function makeCard(filename) {
    const card = el("card-template").content.firstElementChild.cloneNode(true);
    card.querySelector(".filename").textContent = filename;
    card.querySelector(".select").addEventListener("change", updateSummary);
    return card;
  }

  function showError(card, message) {
    card.className = "card failed";
    const badge = card.querySelector(".badge");
    badge.textContent = "Could not analyse";
    const box = card.querySelector(".error");
    box.textContent = message;
    box.hidden = false;
    card.querySelector(".select").checked = false;
  }

  async function showResult(card, r) {
    if (!card.isConnected) return;  // cleared while it was being analysed
    const png = (b64) => `data:image/png;base64,${b64}`;
    // Drawn before the card counts as done, so a done card shows all its images.
    r.overlayUrl = await overlayUrl(png(r.images.original), png(r.images.mask));
    const overlayImg = card.querySelector(".overlay");
    overlayImg.src = r.overlayUrl;
    await overlayImg.decode();
    if (!card.isConnected) return;
    const found = Boolean(r.nerve_found);
    // Near the cut-off the decision could as well have gone the other way: say so
    // rather than show a confident verdict. (Threshold 0: presence does not decide.)
    const uncertain = state.presenceThreshold > 0 &&
      Math.abs(r.presence - state.presenceThreshold) <= state.margin + 1e-9;
    card.className = `card done ${found ? "found" : "none"}${uncertain ? " uncertain" : ""}`;
    card.querySelector(".badge").textContent = r.message;
    card.querySelector(".flag").hidden = !uncertain;
    if (uncertain) {
      const note = card.querySelector(".uncertain-note");
      note.textContent = `Uncertain: within \u00b1${(100 * state.margin).toFixed(0)} points ` +
        "of the threshold; check the frame yourself";
      note.hidden = false;
    }
    card.querySelector(".original").src = png(r.images.original);
    card.querySelector(".views").hidden = false;
    for (const img of card.querySelectorAll(".views img")) {
      img.addEventListener("click", () => openViewer(card, r));
    }

    card.querySelector(".presence").textContent = `${r.presence_percent.toFixed(1)}\u00a0%`;
    card.querySelector(".meter-fill").style.width = `${clampPercent(r.presence_percent)}%`;
    if (state.presenceThreshold === 0) {
      // Calibration chose not to use presence: say what decides instead, so that
      // 43 % "found" beside 42 % "not found" does not read as a contradiction.
      const note = card.querySelector(".threshold");
      note.textContent = state.minArea > 0
        ? `not used: decided by mask area \u2265 ${state.minArea.toLocaleString("en")} px`
        : "not used: decided by the mask";
      note.hidden = false;
    } else if (state.presenceThreshold) {
      // Where the calibrated threshold lies, so 43 % reads as "above the cut-off".
      // (A threshold of 0 means the mask area alone decides; no mark then.)
      const cut = 100 * state.presenceThreshold;
      const mark = card.querySelector(".meter-mark");
      mark.style.left = `${clampPercent(cut)}%`;
      mark.hidden = false;
      const note = card.querySelector(".threshold");
      note.textContent = `threshold ${cut.toFixed(1)}\u00a0%`;
      note.hidden = false;
    }
    if (!found) {
      card.querySelector(".overlay-caption").textContent = "No outline: no nerve found";
    }
    card.querySelector(".area").textContent = `${r.area.toLocaleString()} px`;
    card.querySelector(".area-note").textContent = found
      ? `${(100 * r.area_fraction).toFixed(2)}\u00a0% of frame` : "no nerve found";
    card.querySelector(".size").textContent = `${r.width} × ${r.height} px`;
    card.querySelector(".facts").hidden = false;

    const link = card.querySelector(".download-mask");
    link.href = png(r.images.mask);
    link.download = `${r.name}_mask.png`;
    card.querySelector(".card-actions").hidden = false;

    const select = card.querySelector(".select");
    select.disabled = false;
    state.results.push({card, name: r.name, rle: r.rle});
  }

  function updateSummary() {
    const cards = el("results").children.length;
    const done = el("results").querySelectorAll(".card.done").length;
    const failed = el("results").querySelectorAll(".card.failed").length;
    const found = el("results").querySelectorAll(".card.found").length;
    const pending = cards - done - failed;
    const parts = [`${cards} file${cards === 1 ? "" : "s"}`];
    if (pending) parts.push(`${pending} analysing`);
    parts.push(`${found} with nerve`, `${done - found} without`);
    if (failed) parts.push(`${failed} could not be analysed`);
    el("summary").textContent = parts.join(" · ");
    const selected = selectedResults().length;
    el("research").hidden = cards === 0;
    const uncertain = el("results").querySelectorAll(".card.uncertain").length;
    if (uncertain) el("summary").textContent += ` · ${uncertain} uncertain`;
    const button = el("download-csv");
    button.disabled = selected === 0;
    button.textContent = `Download CSV (${selected})`;
  }

  function selectedResults() {
    return state.results.filter((r) => r.card.isConnected && r.card.querySelector(".select").checked);
  }

  // --- the overlay -----------------------------------------------------------------------

  // The frame with the predicted nerve tinted and outlined in green, drawn here from
  // the frame and its 0/255 mask with imageio.overlay's integer arithmetic, so the
  // pixels are the server's own; the server then encodes two images, not three.
  const PRED_COLOR = [0, 255, 0];

  async function imagePixels(url) {
    const img = new Image();
    img.src = url;
    await img.decode();
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const context = canvas.getContext("2d", {willReadFrequently: true});
    context.drawImage(img, 0, 0);
    return {canvas, context, data: context.getImageData(0, 0, canvas.width, canvas.height)};
  }

  // Python's round(): halves go to the even neighbour (round(2.5) == 2).
  function roundHalfEven(x) {
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  async function overlayUrl(frameUrl, maskUrl) {
    const [frame, mask] = await Promise.all([imagePixels(frameUrl), imagePixels(maskUrl)]);
    const w = frame.canvas.width, h = frame.canvas.height;
    const rgba = frame.data.data, maskRgba = mask.data.data;
    const inMask = new Uint8Array(w * h);
    for (let i = 0; i < w * h; i++) inMask[i] = maskRgba[4 * i] !== 0 ? 1 : 0;
    // The outline: mask pixels within `thickness` 4-connected steps of background or the
    // frame's edge, i.e. not in the mask eroded `thickness` times by the cross.
    const thickness = Math.max(1, roundHalfEven(Math.max(w, h) / 300));
    let inner = inMask;
    for (let k = 0; k < thickness; k++) {
      const next = new Uint8Array(w * h);
      for (let y = 0; y < h; y++) {
        for (let x = 0, i = y * w; x < w; x++, i++) {
          next[i] = inner[i] && x > 0 && inner[i - 1] && x < w - 1 && inner[i + 1] &&
            y > 0 && inner[i - w] && y < h - 1 && inner[i + w] ? 1 : 0;
        }
      }
      inner = next;
    }
    for (let i = 0; i < w * h; i++) {
      if (!inMask[i]) continue;
      for (let c = 0; c < 3; c++) {
        const p = 4 * i + c;
        // Inside: 0.75 * value + 0.25 * colour, rounded down; the outline: the colour.
        rgba[p] = inner[i] ? (3 * rgba[p] + PRED_COLOR[c]) >> 2 : PRED_COLOR[c];
      }
    }
    frame.context.putImageData(frame.data, 0, 0);
    return frame.canvas.toDataURL("image/png");
  }

  // --- the enlarged view ---------------------------------------------------------------

  function openViewer(card, r) {
    const png = (b64) => `data:image/png;base64,${b64}`;
    el("viewer-title").textContent = card.querySelector(".filename").textContent;
    const flag = card.classList.contains("uncertain") ? "Uncertain \u00b7 " : "";
    el("viewer-verdict").textContent =
      `${flag}${r.message} \u00b7 presence ${r.presence_percent.toFixed(1)}\u00a0%`;
    el("viewer").className = `viewer ${card.className.replace(/\bcard\b|\bdone\b/g, "")}`;
    el("viewer-base").src = png(r.images.original);
    el("viewer-overlay").src = r.overlayUrl;
    setOpacity(el("viewer-opacity").value);
    el("viewer").showModal();
  }

  function setOpacity(value) {
    el("viewer-overlay").style.opacity = String(Number(value) / 100);
    el("viewer-opacity-value").textContent = `${value}\u00a0%`;
  }

  // --- downloads -------------------------------------------------------------------------

  // Kaggle's order: '2' before '10', '1_2' before '1_10'.
  function naturalCompare(a, b) {
    return a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
  }

  function csvField(text) {
    return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function downloadCsv() {
    const rows = selectedResults().slice().sort((a, b) => naturalCompare(a.name, b.name));
    const lines = ["img,pixels", ...rows.map((r) => `${csvField(r.name)},${r.rle}`)];
    const blob = new Blob([lines.join("\n") + "\n"], {type: "text/csv"});
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "submission.csv";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  }

  function clearAll() {
    state.queue.length = 0;
    state.results = [];
    el("results").replaceChildren();
    el("toolbar").hidden = true;
    updateSummary();
  }

  function clampPercent(x) {
    return Math.max(0, Math.min(100, x));
  }

  function formatMb(bytes) {
    return (bytes / (1024 * 1024)).toFixed(bytes < 1024 * 1024 ? 2 : 1).replace(/\.0+$/, "");
  }

  // --- wiring ----------------------------------------------------------------------------

  function init() {
    const zone = el("dropzone");
    const input = el("file-input");
    el("choose").addEventListener("click", (e) => { e.stopPropagation(); input.click(); });
    zone.addEventListener("click", () => input.click());
    zone.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
    });
    input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
    }
    for (const type of ["dragleave", "drop"]) {
      zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.remove("over"); });
    }
    zone.addEventListener("drop", (e) => addFiles(e.dataTransfer && e.dataTransfer.files));
    // A file dropped beside the zone must not navigate away from the results.
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());
    el("download-csv").addEventListener("click", downloadCsv);
    el("clear").addEventListener("click", clearAll);
    el("viewer-close").addEventListener("click", () => el("viewer").close());
    el("viewer-opacity").addEventListener("input", (e) => setOpacity(e.target.value));
    pollHealth();
  }

  document.addEventListener("DOMContentLoaded", init);
})();
