// featshard gallery: plain JS, no build step, no network but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, page: 0, threshold: null, queryUrl: null };

async function api(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return body;
}

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

// the file's own name: list entries are often long absolute paths (the full name is in the tooltip)
function shortName(name) {
  if (!name) return "(no name)";
  return name.split(/[\\/]/).pop() || name;
}

function formatScore(score) {
  return typeof score === "number" ? score.toFixed(4) : "";
}

function card(hit, rank) {
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  node.href = `#id=${hit.id}`;
  node.dataset.id = String(hit.id);
  node.title = `${hit.name || "(no name)"}\nrow ${hit.row} of ${hit.run || "?"}\nscore ${formatScore(hit.score)}`;
  const img = node.querySelector("img");
  img.src = `/thumb/${hit.id}`;
  img.alt = hit.name || "";
  img.addEventListener("error", () => node.classList.add("broken"), { once: true });
  node.querySelector(".rank").textContent = rank === undefined ? "" : `#${rank}`;
  node.querySelector(".score").textContent = formatScore(hit.score);
  node.querySelector(".name").textContent = shortName(hit.name);
  return node;
}

function showResults(results) {
  const grid = $("results");
  grid.replaceChildren(...results.map((hit, i) => card(hit, i + 1)));
}

function showQuery(src, caption) {
  if (state.queryUrl && state.queryUrl !== src) { URL.revokeObjectURL(state.queryUrl); state.queryUrl = null; }
  $("query").hidden = false;
  $("query-img").src = src;
  $("query-caption").textContent = caption;
}

async function searchFile(file) {
  if (!file) return;
  const limit = state.info ? state.info.max_upload_mb * 1024 * 1024 : Infinity;
  if (file.size > limit) {
    setStatus(`${file.name} is larger than the server's limit of ${state.info.max_upload_mb} MB`, true);
    return;
  }
  const url = URL.createObjectURL(file);
  showQuery(url, file.name);
  $("query").title = file.name;
  state.queryUrl = url;
  setStatus(`searching for ${file.name}…`);
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("k").value);
  try {
    const body = await api("/api/search", { method: "POST", body: form });
    showResults(body.results);
    setStatus(`${body.results.length} results for ${file.name} in ${body.took_ms.toFixed(0)} ms`);
    if (location.hash) history.pushState(null, "", location.pathname);
  } catch (err) {
    $("results").replaceChildren();
    setStatus(`could not search: ${err.message}`, true);
  }
}

async function searchStored(id) {
  showView("search");
  setStatus(`neighbours of image ${id}…`);
  try {
    const body = await api(`/api/neighbors/${encodeURIComponent(id)}?k=${encodeURIComponent($("k").value)}`);
    showQuery(`/thumb/${body.query.id}`, shortName(body.query.name));
    $("query").title = body.query.name || "";
    showResults(body.results);
    setStatus(`${body.results.length} neighbours of ${shortName(body.query.name)} in ${body.took_ms.toFixed(0)} ms`);
  } catch (err) {
    $("results").replaceChildren();
    setStatus(`could not load neighbours: ${err.message}`, true);
  }
}

function showView(name) {
  $("search-view").hidden = name !== "search";
  $("dups-view").hidden = name !== "dups";
  $("tab-search").classList.toggle("active", name === "search");
  $("tab-dups").classList.toggle("active", name === "dups");
}

async function loadDuplicates(page) {
  const status = $("dups-status");
  const threshold = $("threshold").value;
  status.textContent = "finding duplicate groups…";
  status.classList.remove("error");
  try {
    const body = await api(`/api/dedup?threshold=${encodeURIComponent(threshold)}&page=${page}`);
    state.page = body.page;
    const groups = body.groups.map((group) => {
      const box = document.createElement("section");
      box.className = "group";
      const title = document.createElement("h2");
      title.textContent = `group ${group.group + 1}: ${group.size} images, similarity ` +
        `${formatScore(group.score_min)}–${formatScore(group.score_max)}`;
      const row = document.createElement("div");
      row.className = "grid";
      row.replaceChildren(...group.members.map((m) => card(m)));
      box.replaceChildren(title, row);
      return box;
    });
    $("groups").replaceChildren(...groups);
    status.textContent = body.total ? `${body.total} groups (${body.metric} ${body.threshold})`
      : `no groups at ${body.metric} threshold ${body.threshold}`;
    $("page-label").textContent = body.total ? `page ${body.page + 1} of ${body.pages}` : "";
    $("prev").disabled = body.page <= 0;
    $("next").disabled = body.page + 1 >= body.pages;
  } catch (err) {
    status.textContent = `could not load duplicates: ${err.message}`;
    status.classList.add("error");
  }
}

function route() {
  const hash = location.hash.replace(/^#/, "");
  const match = /^id=(\d+)$/.exec(hash);
  if (match) { searchStored(match[1]); return; }
  if (hash === "dups") { showView("dups"); if (!$("groups").childElementCount) loadDuplicates(0); return; }
  showView("search");
}

function wireDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) searchFile(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
}

async function init() {
  wireDrop();
  window.addEventListener("hashchange", route);
  $("dups-form").addEventListener("submit", (e) => { e.preventDefault(); loadDuplicates(0); });
  $("prev").addEventListener("click", () => loadDuplicates(state.page - 1));
  $("next").addEventListener("click", () => loadDuplicates(state.page + 1));
  try {
    state.info = await api("/api/info");
    const i = state.info;
    const recall = typeof i.recall_at_10 === "number" ? ` · recall@10 ${i.recall_at_10.toFixed(3)}` : "";
    $("info").textContent = `${i.ntotal.toLocaleString()} images · ${i.model} (${i.layer}, ${i.dim}-d) · ` +
      `${i.spec} ${i.metric}${recall} · ${i.device}`;
    if (i.metric === "l2") $("threshold").value = "0.2";
    document.body.dataset.ready = "1";
  } catch (err) {
    $("info").textContent = `server not ready: ${err.message}`;
  }
  route();
}

document.addEventListener("DOMContentLoaded", init);
