// The steering playground: picks vectors from the registry, sends the same prompt steered and
// unsteered as two streamed chat requests, shows the prompt's monitor scores, and writes the
// equivalent curl and openai SDK calls. Everything goes through the public API.
"use strict";

const KEY_STORE = "persona-server-key";
const page = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  model: "default",
  vectors: new Map(),  // name -> summary from GET /v1/vectors
  entries: [],         // chosen steering: {vector, coefficient, layer, positions}
};

const $ = (id) => document.getElementById(id);

class NeedKey extends Error {}

function authHeaders() {
  const headers = { "Content-Type": "application/json" };
  if (page.key) headers.Authorization = `Bearer ${page.key}`;
  return headers;
}

// A 401 means keys are configured and ours is missing or wrong: ask for one, then start over.
async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: authHeaders() });
  if (response.status === 401) {
    const body = await response.json().catch(() => ({}));
    $("key-error").textContent = page.key ? (body.error && body.error.message) || "invalid key" : "";
    $("key-form").hidden = false;
    $("key").focus();
    throw new NeedKey();
  }
  return response;
}

function errorText(body, status) {
  const error = body && body.error;
  if (!error) return `HTTP ${status}`;
  return error.param ? `${error.message} (${error.param})` : error.message;
}

async function load() {
  try {
    const models = await (await api("/v1/models")).json();
    page.model = models.data[0].id;
    $("model").textContent = `${page.model}, context ${models.data[0].max_model_len} tokens`;
    const response = await api("/v1/vectors");
    const listing = await response.json();
    if (!response.ok) throw new Error(errorText(listing, response.status));
    page.vectors = new Map(listing.data.map((v) => [v.id, v]));
    const pick = $("vector-pick");
    pick.replaceChildren(...listing.data.map((v) => new Option(v.id, v.id)));
    $("vectors-status").textContent = `${listing.data.length} vectors in the registry`;
    if (!page.entries.length && page.vectors.has("optimistic")) addEntry("optimistic");
    render();
  } catch (err) {
    if (!(err instanceof NeedKey)) $("vectors-status").textContent = String(err.message || err);
  }
}

function sliderRange(vector) {
  const range = vector.coefficient_range || [0.5, 4];
  return { low: range[0], high: range[1] };
}

function addEntry(name) {
  if (page.entries.some((e) => e.vector === name)) return;
  const vector = page.vectors.get(name);
  const { low, high } = sliderRange(vector);
  const layers = vector.model.num_layers;
  page.entries.push({
    vector: name,
    coefficient: Math.round(((low + high) / 2) * 4) / 4,
    layer: vector.recommended_layer || Math.round(layers * 0.6),
    positions: "all",
  });
}

function select(options, value, onChange) {
  const el = document.createElement("select");
  for (const [label, v] of options) el.add(new Option(label, v, false, String(v) === String(value)));
  el.addEventListener("change", () => onChange(el.value));
  return el;
}

// One row per chosen vector: a slider over -high..high (the recommended magnitudes are
// low..high; negative values push towards the opposite pole), the layer and the positions.
function render() {
  const rows = page.entries.map((entry, index) => {
    const vector = page.vectors.get(entry.vector);
    const { low, high } = sliderRange(vector);
    const row = document.createElement("div");
    row.className = "entry";
    row.dataset.vector = entry.vector;

    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.vector;
    const hint = document.createElement("span");
    hint.className = "range";
    hint.textContent = `recommended |c| ${low}–${high}`;
    name.append(hint);

    const slider = document.createElement("input");
    Object.assign(slider, { type: "range", min: -high, max: high, step: 0.25, value: entry.coefficient });
    slider.setAttribute("aria-label", `${entry.vector} coefficient`);
    const shown = document.createElement("output");
    shown.textContent = entry.coefficient.toFixed(2);
    slider.addEventListener("input", () => {
      entry.coefficient = Number(slider.value);
      shown.textContent = entry.coefficient.toFixed(2);
      writeSnippets();
    });

    const layerOptions = [];
    for (let l = 1; l <= vector.model.num_layers; l++) {
      layerOptions.push([l === vector.recommended_layer ? `layer ${l} (recommended)` : `layer ${l}`, l]);
    }
    const layer = select(layerOptions, entry.layer, (v) => { entry.layer = Number(v); writeSnippets(); });
    layer.className = "layer";
    const positions = select([["all tokens", "all"], ["prompt only", "prompt"], ["response only", "response"]],
      entry.positions, (v) => { entry.positions = v; writeSnippets(); });
    positions.className = "positions";

    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.addEventListener("click", () => { page.entries.splice(index, 1); render(); });
    row.append(name, slider, shown, layer, positions, remove);
    return row;
  });
  $("steering").replaceChildren(...rows);
  writeSnippets();
}

function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

// The steered request as the snippets show it; the page sends it streamed, and once more
// without steering.
function steeredBody() {
  const body = { model: "default", messages: [{ role: "user", content: $("prompt").value }] };
  for (const [field, id] of [["max_tokens", "max-tokens"], ["temperature", "temperature"], ["seed", "seed"]]) {
    const value = numberField(id);
    if (value !== undefined) body[field] = value;
  }
  body.steering = page.entries.map((e) => {
    const entry = { vector: e.vector, coefficient: e.coefficient, layers: [e.layer] };
    if (e.positions !== "all") entry.positions = e.positions;
    return entry;
  });
  body.monitor = { return_scores: true };
  return body;
}

function shellQuote(text) {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

const JSON_WORDS = { null: "null", true: "true", false: "false" };
// JSON text is a Python literal once its three keywords are spelled the Python way.
const PYTHON_WORDS = { null: "None", true: "True", false: "False" };

// One-line JSON with a space after each separator, as people write it by hand.
function literal(value, words) {
  if (value === null || value === true || value === false) return words[String(value)];
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map((v) => literal(v, words)).join(", ")}]`;
  return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${literal(v, words)}`).join(", ")}}`;
}

const pyLiteral = (value) => literal(value, PYTHON_WORDS);

function writeSnippets() {
  const body = steeredBody();
  const auth = page.key ? ` \\\n  -H "Authorization: Bearer $PERSONA_API_KEY"` : "";
  const json = `{\n${Object.entries(body).map(([k, v]) => `  ${JSON.stringify(k)}: ${literal(v, JSON_WORDS)}`).join(",\n")}\n}`;
  $("curl-code").textContent = `curl ${location.origin}/v1/chat/completions${auth} \\\n  -d ${shellQuote(json)}`;

  const { model, messages, steering, monitor, ...sampling } = body;
  const args = [`    model=${pyLiteral(model)},`, `    messages=${pyLiteral(messages)},`];
  for (const [k, v] of Object.entries(sampling)) args.push(`    ${k}=${pyLiteral(v)},`);
  args.push(`    extra_body=${pyLiteral({ steering, monitor })},`);
  const key = page.key ? `os.environ["PERSONA_API_KEY"]` : `"unused"`;
  $("python-code").textContent = [
    page.key ? "import os\n" : "",
    "from openai import OpenAI\n",
    `client = OpenAI(base_url="${location.origin}/v1", api_key=${key})`,
    "reply = client.chat.completions.create(",
    ...args,
    ")",
    "print(reply.choices[0].message.content)",
  ].join("\n").replace(/^\n/, "");
}

// Read an SSE stream of chat chunks into ``pane``; returns the persona_monitor of the last chunk.
async function streamInto(body, pane) {
  pane.textContent = "";
  pane.dataset.chunks = "0";
  pane.dataset.done = "false";
  pane.classList.remove("error");
  const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify({ ...body, stream: true }) });
  if (!response.ok) {
    const error = await response.json().catch(() => null);
    pane.textContent = errorText(error, response.status);
    pane.classList.add("error");
    return error && error.error && error.error.persona_monitor;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let monitor = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) {
          pane.textContent += `\n[${errorText(chunk, 200)}]`;
          pane.classList.add("error");
          continue;
        }
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          pane.textContent += delta.content;
          pane.dataset.chunks = String(Number(pane.dataset.chunks) + 1);
        }
        if (chunk.persona_monitor) monitor = chunk.persona_monitor;
      }
    }
  }
  pane.dataset.done = "true";
  return monitor;
}

function showScores(unsteered, steered) {
  const names = new Set([...Object.keys((unsteered && unsteered.scores) || {}), ...Object.keys((steered && steered.scores) || {})]);
  const cell = (text, cls) => {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  };
  const value = (r) => (r ? (r.z !== null ? r.z : r.score).toFixed(2) : "–");
  const rows = [...names].sort().map((name) => {
    const u = unsteered && unsteered.scores[name];
    const s = steered && steered.scores[name];
    const tr = document.createElement("tr");
    tr.dataset.vector = name;
    const action = (s || u).action;
    tr.append(cell(name), cell(String((s || u).layer)), cell(value(u)), cell(value(s)),
      cell(action, action === "allow" ? "" : action));
    return tr;
  });
  $("scores").tBodies[0].replaceChildren(...rows);
  $("scores-note").textContent = rows.length ? "" :
    "No monitor is configured, so there is nothing to score: an admin adds one with PUT /v1/monitors/{vector}.";
}

async function send() {
  $("send").disabled = true;
  $("status").textContent = "generating…";
  const body = steeredBody();
  const { steering, ...plain } = body;
  try {
    const [steered, unsteered] = await Promise.all([streamInto(body, $("steered")), streamInto(plain, $("unsteered"))]);
    showScores(unsteered, steered);
    $("status").textContent = "done";
  } catch (err) {
    $("status").textContent = err instanceof NeedKey ? "an API key is needed" : String(err.message || err);
  } finally {
    $("send").disabled = false;
  }
}

$("add-vector").addEventListener("click", () => { addEntry($("vector-pick").value); render(); });
$("send").addEventListener("click", send);
for (const id of ["prompt", "max-tokens", "temperature", "seed"]) $(id).addEventListener("input", writeSnippets);
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  page.key = $("key").value.trim();
  sessionStorage.setItem(KEY_STORE, page.key);
  $("key-form").hidden = true;
  load();
});
for (const button of document.querySelectorAll("[data-copy]")) {
  button.addEventListener("click", () => navigator.clipboard.writeText($(button.dataset.copy).textContent));
}
load();
