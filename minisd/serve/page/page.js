// minisd's page: plain JavaScript against the server's own routes (no library, no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const png = (b64) => "data:image/png;base64," + b64;

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

// the form as A1111's txt2img fields; width/height left out when empty: the model's own size
function request(extra) {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, sampler_name: $("sampler").value,
    steps: Number($("steps").value), cfg_scale: Number($("cfg").value), seed: Number($("seed").value),
  };
  if ($("width").value) body.width = Number($("width").value);
  if ($("height").value) body.height = Number($("height").value);
  return Object.assign(body, extra || {});
}

async function post(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) {
    const text = await response.text();
    let detail = text;
    try { detail = JSON.parse(text).detail; } catch (e) { /* not JSON: show it as it is */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

// -- tab 1: generate, watching each step's x0 -----------------------------------------------------------------

async function generate() {
  $("error").textContent = "";
  $("strip").replaceChildren();
  $("params").value = "";
  $("result").removeAttribute("src");
  $("run").disabled = true;
  $("status").textContent = "queued";
  try {
    const response = await post("/minisd/v1/txt2img/stream", request());
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = JSON.parse(buffer.slice(0, newline));
        buffer = buffer.slice(newline + 1);
        show(line);
      }
    }
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    $("run").disabled = false;
  }
}

function show(line) {
  if (line.detail) throw new Error(line.detail);
  if (line.step !== undefined) {                      // one step: its x0 estimate and noise level
    const caption = `step ${line.step}/${line.steps}, sigma ${line.sigma.toFixed(3)}`;
    $("live").src = png(line.preview);
    $("live-caption").textContent = caption;
    $("status").textContent = caption;
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = png(line.preview);
    img.className = "preview";
    img.title = caption;
    const label = document.createElement("figcaption");
    label.textContent = "\u03c3 " + line.sigma.toFixed(2);
    figure.append(img, label);
    $("strip").append(figure);
    return;
  }
  $("result").src = png(line.images[0]);              // the reply: the image and its parameters line
  $("params").value = line.infotexts[0];
  $("status").textContent = line.info && JSON.parse(line.info).interrupted ? "interrupted" : "done";
}

// -- tab 2: guidance scales side by side, and the attention map of a word -------------------------------------

async function compareCfg() {
  $("learn-error").textContent = "";
  $("cfg-row").replaceChildren();
  try {
    for (const scale of [1, 3, 7.5]) {                 // one request each: the server's queue runs them in order
      const reply = await (await post("/sdapi/v1/txt2img", request({ cfg_scale: scale }))).json();
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = png(reply.images[0]);
      img.className = "big cfg";
      const label = document.createElement("figcaption");
      label.textContent = "CFG " + scale;
      figure.append(img, label);
      $("cfg-row").append(figure);
    }
  } catch (e) {
    $("learn-error").textContent = e.message;
  }
}

let attention = null;                                  // the last reply: {image, words: [{text, map}]}

async function runAttention() {
  $("learn-error").textContent = "";
  $("words").replaceChildren();
  try {
    attention = await (await post("/minisd/v1/attention", request())).json();
  } catch (e) {
    $("learn-error").textContent = e.message;
    return;
  }
  const image = new Image();
  image.onload = () => {
    attention.picture = image;
    attention.words.forEach((word, i) => {
      const button = document.createElement("button");
      button.textContent = word.text;
      button.className = "word";
      button.onclick = () => drawMap(i);
      $("words").append(button);
    });
    const first = attention.words.findIndex((w) => /\w/.test(w.text));
    drawMap(Math.max(first, 0));
  };
  image.src = png(attention.image);
}

// the image, and over it the word's map scaled to [0, 1] in a blue-to-red ramp, half transparent
function drawMap(index) {
  const canvas = $("attention");
  const ctx = canvas.getContext("2d");
  const map = attention.words[index].map;
  const h = map.length, w = map[0].length;
  const max = Math.max(...map.flat()), min = Math.min(...map.flat());
  const small = document.createElement("canvas");
  small.width = w;
  small.height = h;
  const pixels = small.getContext("2d").createImageData(w, h);
  map.flat().forEach((v, i) => {
    const t = max > min ? (v - min) / (max - min) : 0;
    pixels.data.set([255 * t, 80 * (1 - Math.abs(2 * t - 1)), 255 * (1 - t), 150], 4 * i);
  });
  small.getContext("2d").putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(attention.picture, 0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingEnabled = true;                    // the map is coarse (the latent grid): blend it
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
  document.querySelectorAll("#words button").forEach((b, i) => b.classList.toggle("active", i === index));
  canvas.dataset.word = attention.words[index].text;
}

// -- the form -------------------------------------------------------------------------------------------------

async function init() {
  for (const button of document.querySelectorAll(".tabs button")) {
    button.onclick = () => {
      for (const b of document.querySelectorAll(".tabs button")) {
        b.classList.toggle("active", b === button);
        $(b.dataset.tab).hidden = b !== button;
      }
    };
  }
  $("run").onclick = generate;
  $("cfg-run").onclick = compareCfg;
  $("attention-run").onclick = runAttention;
  $("key").onchange = loadSamplers;
  await loadSamplers();
}

// the sampler list is the server's (a server with an API key answers once the key is typed)
async function loadSamplers() {
  try {
    const response = await fetch("/sdapi/v1/samplers", { headers: headers() });
    const list = response.ok ? await response.json() : [{ name: "DPM++ 2M" }];
    $("sampler").replaceChildren(...list.map((s) => new Option(s.name, s.name, false, s.name === "DPM++ 2M")));
  } catch (e) {
    $("error").textContent = e.message;
  }
}

init();
