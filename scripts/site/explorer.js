// The attention explorer: draws a scene with the attention of one token over its image patches, and the prefix-LM
// mask. Data: attention.json beside the page, written by scripts/build_site.py. Plain JavaScript, nothing fetched
// from outside the site. Loaded on every page (extra_javascript); does nothing where there is no explorer.
(function () {
  "use strict";
  // magma-like colour ramp: 0 -> dark purple, 1 -> pale yellow
  const STOPS = [[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]];

  function ramp(v) {
    const x = Math.max(0, Math.min(1, v)) * (STOPS.length - 1), i = Math.min(Math.floor(x), STOPS.length - 2), f = x - i;
    return STOPS[i].map((c, k) => Math.round(c + f * (STOPS[i + 1][k] - c)));
  }

  function button(text, cls, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    if (cls) b.className = cls;
    b.addEventListener("click", onClick);
    return b;
  }

  function start(root) {
    const $ = (id) => document.getElementById(id);
    const canvas = $("ae-image"), maskCanvas = $("ae-mask"), select = $("ae-layer"), caption = $("ae-caption");
    const state = { data: null, scene: 0, token: 0, layer: "mean", image: null };

    function mapOf(tok) {
      if (state.layer === "mean") return tok.mean;
      if (state.layer === "rollout") return tok.rollout;
      return tok.layers[Number(state.layer)];
    }

    function layerName() {
      if (state.layer === "mean") return "average of the " + state.data.layers + " decoder layers";
      if (state.layer === "rollout") return "layer average traced through the vision rollout";
      return "decoder layer " + state.layer;
    }

    function drawImage() {
      const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
      const scene = state.data.scenes[state.scene], tok = scene.tokens[state.token];
      const [gh, gw] = state.data.grid, m = mapOf(tok), max = Math.max(...m, 1e-12);
      ctx.imageSmoothingEnabled = false;
      ctx.clearRect(0, 0, W, H);
      if (state.image) { ctx.drawImage(state.image, 0, 0, W, H); canvas.dataset.image = "loaded"; }
      for (let r = 0; r < gh; r++) {
        for (let c = 0; c < gw; c++) {
          const [R, G, B] = ramp(m[r * gw + c] / max);
          ctx.fillStyle = "rgba(" + R + "," + G + "," + B + ",0.6)";
          ctx.fillRect(c * W / gw, r * H / gh, W / gw, H / gh);
        }
      }
      ctx.strokeStyle = "rgba(255,255,255,0.35)";
      for (let k = 1; k < gw; k++) { ctx.beginPath(); ctx.moveTo(k * W / gw, 0); ctx.lineTo(k * W / gw, H); ctx.stroke(); }
      for (let k = 1; k < gh; k++) { ctx.beginPath(); ctx.moveTo(0, k * H / gh); ctx.lineTo(W, k * H / gh); ctx.stroke(); }
      const where = tok.kind === "answer" ? "answer token, written by the query at position " + tok.query
                                          : "prompt token at position " + tok.position;
      caption.textContent = "\u201c" + tok.text + "\u201d (" + where + "), " + layerName() + ": " +
        Math.round(100 * tok.image_share) + "% of its layer-averaged attention is on the image.";
    }

    function drawMask() {
      const scene = state.data.scenes[state.scene], rows = scene.mask.rows, T = rows.length;
      const cell = Math.max(4, Math.floor(360 / T)), size = cell * T, ctx = maskCanvas.getContext("2d");
      maskCanvas.width = size; maskCanvas.height = size;
      for (let i = 0; i < T; i++) {
        for (let j = 0; j < T; j++) {
          ctx.fillStyle = rows[i][j] === "1" ? "#283593" : "#e8eaf6";
          ctx.fillRect(j * cell, i * cell, cell, cell);
        }
      }
      ctx.strokeStyle = "#ff9800"; ctx.lineWidth = 1;
      for (const b of scene.mask.boundaries) {
        ctx.beginPath(); ctx.moveTo(b * cell, 0); ctx.lineTo(b * cell, size); ctx.stroke();
        ctx.beginPath(); ctx.moveTo(0, b * cell); ctx.lineTo(size, b * cell); ctx.stroke();
      }
      const q = scene.tokens[state.token].query;
      ctx.strokeStyle = "#e53935"; ctx.lineWidth = 2;
      ctx.strokeRect(1, q * cell + 1, size - 2, cell - 2);
    }

    function maskHover(ev) {
      const scene = state.data.scenes[state.scene], T = scene.mask.rows.length, rect = maskCanvas.getBoundingClientRect();
      const j = Math.floor((ev.clientX - rect.left) / rect.width * T), i = Math.floor((ev.clientY - rect.top) / rect.height * T);
      if (i < 0 || j < 0 || i >= T || j >= T) return;
      const lab = scene.mask.labels;
      $("ae-mask-caption").textContent = "query " + i + " \u201c" + lab[i] + "\u201d \u2192 key " + j + " \u201c" + lab[j] +
        "\u201d: " + (scene.mask.rows[i][j] === "1" ? "may attend" : "masked");
    }

    function selectToken(k) {
      state.token = k;
      root.querySelectorAll(".ae-tokens button").forEach((b) => b.setAttribute("aria-pressed", String(Number(b.dataset.k) === k)));
      drawImage(); drawMask();
    }

    function selectScene(s) {
      state.scene = s;
      const scene = state.data.scenes[s];
      root.querySelectorAll(".ae-scenes button").forEach((b, i) => b.setAttribute("aria-selected", String(i === s)));
      const prompt = $("ae-prompt"), answer = $("ae-answer");
      prompt.replaceChildren(); answer.replaceChildren();
      scene.tokens.forEach((tok, k) => {
        const b = button(tok.text, tok.kind === "answer" ? "ae-answer" : "", () => selectToken(k));
        b.dataset.k = k;
        (tok.kind === "answer" ? answer : prompt).appendChild(b);
      });
      $("ae-mask-caption").textContent = "";
      const first = scene.tokens.findIndex((t) => t.kind === "answer");
      state.image = null;
      delete canvas.dataset.image;
      const img = new Image();
      img.onload = () => { state.image = img; drawImage(); };
      img.src = scene.image;
      selectToken(first >= 0 ? first : 0);
    }

    fetch(root.dataset.src)
      .then((r) => { if (!r.ok) throw new Error("HTTP " + r.status + " for " + r.url); return r.json(); })
      .then((data) => {
        state.data = data;
        const opts = [["mean", "average of layers"]];
        for (let l = 0; l < data.layers; l++) opts.push([String(l), "layer " + l]);
        opts.push(["rollout", "rollout (vision tower)"]);
        for (const [v, t] of opts) { const o = document.createElement("option"); o.value = v; o.textContent = t; select.appendChild(o); }
        select.addEventListener("change", () => { state.layer = select.value; drawImage(); });
        const scenes = $("ae-scenes");
        data.scenes.forEach((s, i) => {
          const b = button(s.prompt, "", () => selectScene(i));
          b.setAttribute("role", "tab");
          scenes.appendChild(b);
        });
        maskCanvas.addEventListener("mousemove", maskHover);
        selectScene(0);
        root.dataset.ready = "true";
      })
      .catch((e) => { caption.textContent = "Could not load the attention data (" + e.message + "): serve the site over HTTP, "
                                            + "e.g. python -m http.server -d site."; });
  }

  function init() {
    const root = document.getElementById("ae-root");
    if (root) start(root);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
