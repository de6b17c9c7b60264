// brainscan serve: the page's behaviour. Plain JavaScript, no dependencies, nothing fetched but this server's API.
// Server and file data reach the DOM only through textContent and attributes, never innerHTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);

  const el = {
    disclaimer: $("disclaimer-text"),
    dropZone: $("drop-zone"),
    fileInput: $("file-input"),
    maxSize: $("max-size"),
    error: $("error"),
    result: $("result"),
    status: $("status"),
    body: $("result-body"),
    slice: $("slice"),
    overlay: $("overlay"),
    caption: $("viewer-caption"),
    label: $("result-label"),
    confidence: $("result-confidence"),
    fileInfo: $("file-info"),
    decision: $("decision"),
    probs: $("probabilities"),
    camControls: $("cam-controls"),
    camToggle: $("cam-toggle"),
    camOpacity: $("cam-opacity"),
    camOpacityValue: $("cam-opacity-value"),
    camNote: $("cam-note"),
    card: $("model-card"),
  };

  const STATUS_WORDS = {
    400: "The request was not understood",
    404: "The server has no such endpoint",
    408: "The upload took too long",
    409: "Not available for this model",
    413: "The file is too large",
    415: "Not a supported image",
    422: "The image could not be read",
    429: "Too many requests",
    500: "The server failed while analysing the file",
    502: "The server is unreachable",
    503: "The server is busy",
    504: "The server took too long",
  };

  let model = null; // the /v1/model card, once loaded
  let maxUploadBytes = null;
  let inFlight = null; // AbortController of the upload being analysed

  // ------------------------------------------------------------------------------------------- formatting

  function percent(p) {
    if (typeof p !== "number" || !isFinite(p)) return "–";
    const v = p * 100;
    if (v > 0 && v < 0.1) return "<0.1%";
    if (v < 100 && v > 99.9) return ">99.9%";
    return v.toFixed(1) + "%";
  }

  function bytes(n) {
    if (typeof n !== "number" || !isFinite(n)) return "";
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KB";
    // A limit set as "20 MB" may be 20 × 10^6 or 20 × 2^20 bytes: show either as the round number it was.
    if (Number.isInteger(n / 1048576)) return n / 1048576 + " MB";
    if (Number.isInteger(n / 1e6)) return n / 1e6 + " MB";
    return (n / 1048576).toFixed(1) + " MB";
  }

  function text(value) {
    if (value === null || value === undefined || value === "") return "–";
    if (typeof value === "boolean") return value ? "yes" : "no";
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  // The checkpoint records the initial weights as asked for: "none", a torchvision name, or a file.
  function weightsWords(pretrained) {
    if (pretrained === false || pretrained === null || pretrained === "none" || pretrained === "") {
      return "none (trained from scratch)";
    }
    if (pretrained === true) return "pretrained";
    return `${text(pretrained)} (fine-tuned)`;
  }

  function make(tag, className, content) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (content !== undefined) node.textContent = content;
    return node;
  }

  // FastAPI's detail is a string, or a list of {loc, msg} for validation errors; anything else gets generic words.
  function detailWords(detail) {
    if (typeof detail === "string" && detail.trim()) return detail.trim();
    if (Array.isArray(detail)) {
      const parts = detail
        .map((item) => {
          if (typeof item === "string") return item;
          if (item && typeof item.msg === "string") {
            const where = Array.isArray(item.loc) ? item.loc.filter((x) => x !== "body").join(" ") : "";
            return where ? `${where}: ${item.msg}` : item.msg;
          }
          return "";
        })
        .filter(Boolean);
      if (parts.length) return parts.join("; ");
    }
    if (detail && typeof detail === "object" && typeof detail.message === "string") return detail.message;
    return "";
  }

  async function errorMessage(response) {
    let detail = "";
    try {
      const type = response.headers.get("content-type") || "";
      if (type.includes("json")) detail = detailWords((await response.json()).detail);
    } catch (_) {
      // an unreadable body: the status words below still explain it
    }
    const words = STATUS_WORDS[response.status] || `The server answered with an error (HTTP ${response.status})`;
    // A server-side failure may carry a traceback in its body; only short client-error details are shown verbatim.
    if (detail && (response.status < 500 || response.status === 503) && detail.length < 600) {
      return detail;
    }
    return words + ".";
  }

  // ------------------------------------------------------------------------------------------------ errors

  function showError(message) {
    el.error.replaceChildren(make("strong", "", "The file could not be analysed. "), make("span", "", message));
    el.error.hidden = false;
  }

  function clearError() {
    el.error.hidden = true;
    el.error.replaceChildren();
  }

  // ------------------------------------------------------------------------------------------ model card

  function renderModel(card) {
    if (card.disclaimer) el.disclaimer.textContent = card.disclaimer;
    if (typeof card.max_upload_bytes === "number" && card.max_upload_bytes > 0) {
      maxUploadBytes = card.max_upload_bytes;
      el.maxSize.textContent = bytes(maxUploadBytes);
    }

    const classes = card.class_names || [];
    $("model-arch").textContent = text(card.arch || card.name);
    $("model-classes").textContent = classes.length ? classes.join(", ") : "–";
    const size = card.preprocess && card.preprocess.image_size;
    $("model-input").textContent = size ? `${size} × ${size} px grey-scale slice` : "–";
    $("model-pretrained").textContent = weightsWords(card.pretrained);
    $("model-backend").textContent = text(card.backend);
    const sha = $("model-sha");
    sha.textContent = card.sha256 ? card.sha256.slice(0, 12) : "–";
    if (card.sha256) sha.title = `sha256 ${card.sha256}` + (card.file ? ` (${card.file})` : "");
    const t = card.calibration && card.calibration.temperature;
    $("model-calibration").textContent =
      typeof t === "number" ? `temperature scaling, T = ${t.toFixed(2)}` : "none (raw softmax)";
    const op = card.operating_point;
    if (op && typeof op.threshold === "number") {
      $("model-op").textContent = `${percent(op.threshold)}` + (op.method ? ` (${op.method})` : "");
      $("model-op-row").hidden = false;
    }

    renderMetrics(card.metrics);
    $("model-status").hidden = true;
    $("model-body").hidden = false;
    el.card.setAttribute("aria-busy", "false");
  }

  function renderMetrics(metrics) {
    if (!metrics) {
      $("metrics-missing").hidden = false;
      return;
    }
    const rows = [
      ["Accuracy", metrics.accuracy, percent],
      ["Balanced accuracy", metrics.balanced_accuracy, percent],
      ["Macro F1", metrics.macro_f1, (v) => v.toFixed(3)],
      ["ROC AUC", metrics.roc_auc, (v) => v.toFixed(3)],
      ["Sensitivity", metrics.sensitivity, percent],
      ["Specificity", metrics.specificity, percent],
    ];
    const body = $("metrics-rows");
    body.replaceChildren();
    for (const [name, value, format] of rows) {
      if (typeof value !== "number" || !isFinite(value)) continue;
      const tr = make("tr");
      tr.append(make("th", "", name), make("td", "", format(value)));
      tr.firstChild.scope = "row";
      body.append(tr);
    }

    const protocol = metrics.protocol || {};
    const split = metrics.split || protocol.split || "test";
    const evaluated = metrics.n_evaluated ?? protocol.n_evaluated;
    $("metrics-caption").textContent = `Metrics on the ${split} split`;
    const n = protocol.n_images || {};
    const facts = [
      ["Split", evaluated != null ? `${split}, ${evaluated} images` : split],
      ["Images", ["train", "val", "test"].filter((k) => k in n).map((k) => `${k} ${n[k]}`).join(" · ")],
      ["Split method", protocol.split_method],
      ["Grouping", protocol.grouping],
      ["De-duplication", protocol.deduplication],
      ["Dataset", protocol.dataset],
    ];
    const dl = $("protocol");
    dl.replaceChildren();
    for (const [name, value] of facts) {
      if (value === undefined || value === null || value === "") continue;
      const row = make("div");
      row.append(make("dt", "", name), make("dd", "", text(value)));
      dl.append(row);
    }
    const confounding = protocol.confounding;
    if (confounding && confounding.flagged && confounding.headline) {
      const note = $("confounding");
      note.textContent = confounding.headline;
      note.hidden = false;
    }
    $("metrics-block").hidden = false;
  }

  async function loadModel() {
    try {
      const response = await fetch("/v1/model", { headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error(await errorMessage(response));
      model = await response.json();
      renderModel(model);
    } catch (err) {
      const status = $("model-status");
      status.textContent = `The model's details could not be loaded: ${err && err.message ? err.message : "no answer"}.`;
      status.classList.add("warn");
      el.card.setAttribute("aria-busy", "false");
    }
  }

  // ----------------------------------------------------------------------------------------------- result

  function setState(state, statusText) {
    el.result.dataset.state = state;
    el.result.setAttribute("aria-busy", state === "loading" ? "true" : "false");
    el.status.textContent = statusText;
  }

  function clearResult() {
    el.body.hidden = true;
    el.slice.removeAttribute("src");
    el.overlay.removeAttribute("src");
    el.overlay.hidden = true;
    el.probs.replaceChildren();
    el.decision.hidden = true;
    el.camControls.hidden = true;
    el.camNote.hidden = true;
  }

  function renderProbabilities(probabilities, predicted) {
    const order = (model && model.class_names) || Object.keys(probabilities);
    const names = order.filter((c) => c in probabilities).concat(Object.keys(probabilities).filter((c) => !order.includes(c)));
    el.probs.replaceChildren();
    for (const name of names) {
      const p = Number(probabilities[name]);
      const li = make("li", "prob-row" + (name === predicted ? " predicted" : ""));
      li.dataset.class = name;
      const head = make("div", "prob-head");
      const labelId = `prob-label-${el.probs.children.length}`;
      const nameNode = make("span", "prob-name", name);
      nameNode.id = labelId;
      head.append(nameNode, make("span", "prob-value", percent(p)));
      const bar = make("div", "prob-bar");
      bar.setAttribute("role", "progressbar");
      bar.setAttribute("aria-labelledby", labelId);
      bar.setAttribute("aria-valuemin", "0");
      bar.setAttribute("aria-valuemax", "100");
      bar.setAttribute("aria-valuenow", (p * 100).toFixed(1));
      bar.setAttribute("aria-valuetext", percent(p));
      const fill = make("div", "prob-fill");
      fill.style.width = `${Math.max(0, Math.min(100, p * 100))}%`;
      bar.append(fill);
      li.append(head, bar);
      el.probs.append(li);
    }
  }

  function renderDecision(decision) {
    if (!decision || typeof decision.tumour !== "boolean") {
      el.decision.hidden = true;
      return;
    }
    el.decision.replaceChildren();
    el.decision.classList.toggle("positive", decision.tumour);
    el.decision.append(
      make("strong", "", decision.tumour ? "Above the tumour threshold" : "Below the tumour threshold"),
      make(
        "span",
        "",
        ` — tumour probability ${percent(decision.tumour_probability)}; the model's operating threshold is ` +
          `${percent(decision.threshold)}.`,
      ),
    );
    el.decision.hidden = false;
  }

  function applyOverlayControls() {
    const value = Number(el.camOpacity.value);
    el.overlay.style.opacity = String(value / 100);
    el.camOpacityValue.textContent = `${value}%`;
    el.overlay.hidden = !el.camToggle.checked || !el.overlay.getAttribute("src");
    el.camOpacity.disabled = !el.camToggle.checked;
  }

  function renderCam(cam, reason) {
    if (cam && cam.overlay_png) {
      el.overlay.src = `data:image/png;base64,${cam.overlay_png}`;
      const target = cam.target ? ` for “${cam.target}”` : "";
      el.overlay.alt = `Activation map${target} over the slice`;
      el.camControls.hidden = false;
      el.camNote.textContent =
        `The activation map (${cam.method || "class activation map"}${target}) shows where the model looked ` +
        "when it classified this slice. It is not a diagnosis and does not outline a tumour.";
      el.caption.textContent = "The slice as the model saw it, with the activation map (warm colours: strongest).";
      applyOverlayControls();
    } else {
      const why = reason || "the server returned none for this slice";
      el.camNote.textContent = /^no activation map/i.test(why) ? `${why}.` : `No activation map: ${why}.`;
      el.caption.textContent = "The slice as the model saw it.";
    }
    el.camNote.hidden = false;
  }

  function renderResult(data, camReason) {
    el.label.textContent = text(data.label);
    const probs = data.probabilities || {};
    el.confidence.textContent = data.label in probs ? percent(Number(probs[data.label])) : "";
    const file = data.file || {};
    const parts = [file.name, file.format ? String(file.format).toUpperCase() : "", bytes(file.bytes)].filter(Boolean);
    if (typeof data.elapsed_ms === "number") parts.push(`analysed in ${Math.round(data.elapsed_ms)} ms`);
    el.fileInfo.textContent = parts.join(" · ");
    renderDecision(data.decision);
    renderProbabilities(probs, data.label);
    if (data.slice_png) {
      el.slice.src = `data:image/png;base64,${data.slice_png}`;
      el.slice.hidden = false;
    } else {
      el.slice.hidden = true;
    }
    renderCam(data.cam, camReason);
    if (data.disclaimer) el.disclaimer.textContent = data.disclaimer;
    el.body.hidden = false;
    setState("done", `Result for ${file.name || "the uploaded file"}.`);
  }

  // ----------------------------------------------------------------------------------------------- upload

  async function post(file, cam, signal) {
    const form = new FormData();
    form.append("file", file, file.name);
    const query = new URLSearchParams({ cam: String(cam), slice: "true" });
    return fetch(`/v1/predict?${query}`, { method: "POST", body: form, signal });
  }

  async function analyse(file) {
    if (!file) return;
    if (inFlight) inFlight.abort();
    clearError();
    clearResult();

    if (maxUploadBytes && file.size > maxUploadBytes) {
      setState("error", `No result for ${file.name}: it was not uploaded.`);
      showError(`The file is ${bytes(file.size)}; the server accepts files up to ${bytes(maxUploadBytes)}.`);
      return;
    }
    if (file.size === 0) {
      setState("error", `No result for ${file.name}: it was not uploaded.`);
      showError("The file is empty.");
      return;
    }

    const controller = new AbortController();
    inFlight = controller;
    setState("loading", `Analysing ${file.name}…`);
    const wantCam = !model || model.cam_available !== false;
    let camReason = wantCam ? "" : (model.cam_unavailable_reason || "this model has none").replace(/\.$/, "");
    try {
      let response = await post(file, wantCam, controller.signal);
      if (wantCam && (response.status === 409 || response.status === 503)) {
        // No map for this model (409), or the map queue is full (503): predict without one and say why.
        camReason =
          response.status === 503
            ? "the server is busy drawing other maps; upload the file again for one"
            : (await errorMessage(response)).replace(/\.$/, "");
        response = await post(file, false, controller.signal);
      }
      if (!response.ok) throw new Error(await errorMessage(response));
      const data = await response.json();
      if (controller !== inFlight) return;
      renderResult(data, camReason);
    } catch (err) {
      if (controller !== inFlight || (err && err.name === "AbortError")) return;
      const message =
        err instanceof TypeError
          ? "The brainscan server could not be reached. Check that it is still running, then try again."
          : (err && err.message) || "Unknown error.";
      setState("error", `No result for ${file.name}.`);
      showError(message);
    } finally {
      if (controller === inFlight) inFlight = null;
      // The same file can be chosen again (a change event needs a new value).
      el.fileInput.value = "";
    }
  }

  // ------------------------------------------------------------------------------------------------ wiring

  el.fileInput.addEventListener("change", () => analyse(el.fileInput.files && el.fileInput.files[0]));

  el.dropZone.addEventListener("click", (event) => {
    // The label opens the picker by itself; a second click() would open it twice.
    if (event.target.closest("label") || event.target === el.fileInput) return;
    el.fileInput.click();
  });
  el.dropZone.addEventListener("keydown", (event) => {
    if (event.target !== el.dropZone) return;
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      el.fileInput.click();
    }
  });

  let dragDepth = 0; // dragenter/dragleave fire for every child; count them to know when the pointer really left
  el.dropZone.addEventListener("dragenter", (event) => {
    event.preventDefault();
    dragDepth += 1;
    el.dropZone.classList.add("dragging");
  });
  el.dropZone.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) el.dropZone.classList.remove("dragging");
  });
  el.dropZone.addEventListener("dragover", (event) => {
    event.preventDefault();
    if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
  });
  el.dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    el.dropZone.classList.remove("dragging");
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) analyse(files[0]);
  });
  // A file dropped beside the zone must not make the browser navigate away from the page to open it.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => {
      if (!el.dropZone.contains(event.target)) event.preventDefault();
    });
  }

  el.camToggle.addEventListener("change", applyOverlayControls);
  el.camOpacity.addEventListener("input", applyOverlayControls);

  // Small slices (e.g. 32 px) are shown as crisp pixels rather than blurred when enlarged.
  el.slice.addEventListener("load", () => {
    el.slice.classList.toggle("pixelated", el.slice.naturalWidth > 0 && el.slice.naturalWidth < 128);
    el.overlay.classList.toggle("pixelated", el.slice.classList.contains("pixelated"));
  });

  applyOverlayControls();
  loadModel();
})();
