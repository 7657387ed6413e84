// The web chat: talks to /api/chat, /api/history, /api/reset, /api/feedback (👍/👎 under each
// answer) and /api/again ("Try again" on the latest answer). The conversation id, the API token
// (when the server needs one) and this browser's ratings are kept in its localStorage.
"use strict";

const log = document.getElementById("log");
const chatForm = document.getElementById("chat-form");
const textInput = document.getElementById("text");
const sendButton = document.getElementById("send");
const tokenForm = document.getElementById("token-form");
const welcome = document.getElementById("welcome");
const UNREACHABLE = "Can't reach the bot: the server is not answering. Check that it is running, then try again.";

function conversationId() {
  let id = localStorage.getItem("blenderchat.conversation");
  if (!id) {
    id = crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + "-" + Math.random().toString(36).slice(2);
    localStorage.setItem("blenderchat.conversation", id);
  }
  return id;
}

function show(kind, text) {
  welcome.remove();
  const div = document.createElement("div");
  div.className = "msg " + kind;
  div.textContent = text;  // never innerHTML: replies are untrusted text
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

// This browser's rating of each answer, by exchange id, so the chosen one stays shown on reload.
function ratings() {
  try { return JSON.parse(localStorage.getItem("blenderchat.ratings")) || {}; } catch (e) { return {}; }
}

function remember(exchangeId, rating) {
  const all = ratings();
  all[exchangeId] = rating;
  const ids = Object.keys(all);
  if (ids.length > 500) delete all[ids[0]];  // bounded: the oldest go first
  localStorage.setItem("blenderchat.ratings", JSON.stringify(all));
}

// The buttons under an answer that is a stored exchange: 👍 / 👎, and "Try again" on the latest
// answer only (the bot can redo only that one). `bar.dataset.exchange` is the answer shown now.
function addActions(bubble, exchangeId) {
  for (const old of log.querySelectorAll(".actions .again")) old.remove();
  const bar = document.createElement("div");
  bar.className = "actions";
  bar.dataset.exchange = exchangeId;
  for (const [rating, label, title] of [["good", "👍", "Good reply"], ["bad", "👎", "Bad reply"]]) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "rate " + rating;
    button.textContent = label;
    button.title = title;
    button.setAttribute("aria-label", title);
    button.addEventListener("click", () => rate(bar, rating));
    bar.appendChild(button);
  }
  const again = document.createElement("button");
  again.type = "button";
  again.className = "again";
  again.textContent = "🔁 Try again";
  again.title = "Another answer to the same message";
  again.addEventListener("click", () => tryAgain(bubble, bar));
  bar.appendChild(again);
  const note = document.createElement("span");
  note.className = "note";
  bar.appendChild(note);
  bubble.after(bar);
  showRating(bar);
}

function showRating(bar) {
  const chosen = ratings()[bar.dataset.exchange];
  for (const button of bar.querySelectorAll(".rate")) {
    button.setAttribute("aria-pressed", String(button.classList.contains(chosen)));
  }
}

async function rate(bar, rating) {
  const note = bar.querySelector(".note");
  note.textContent = "";
  try {
    await api("POST", "/api/feedback", {conversation: conversationId(), exchange_id: bar.dataset.exchange, rating});
    remember(bar.dataset.exchange, rating);
    showRating(bar);
  } catch (error) {
    note.textContent = error.message;
  }
}

async function tryAgain(bubble, bar) {
  const note = bar.querySelector(".note");
  const before = bubble.textContent;
  note.textContent = "";
  for (const button of bar.querySelectorAll("button")) button.disabled = true;
  bubble.className = "msg bot thinking";
  bubble.textContent = "thinking…";
  try {
    const data = await api("POST", "/api/again", {conversation: conversationId(), exchange_id: bar.dataset.exchange});
    bubble.textContent = data.reply;
    bar.dataset.exchange = data.exchange_id;  // a new answer: the rating of the old one is not its rating
    showRating(bar);
  } catch (error) {
    bubble.textContent = before;  // the old answer stays
    note.textContent = error.message;
  } finally {
    bubble.className = "msg bot";
    for (const button of bar.querySelectorAll("button")) button.disabled = false;
  }
}

// Every request of the page goes through here: JSON in and out, the token when one was given.
async function api(method, path, body) {
  const headers = {"Content-Type": "application/json"};
  const token = localStorage.getItem("blenderchat.token");
  if (token) headers["Authorization"] = "Bearer " + token;
  let response;
  try {
    response = await fetch(path, {method, headers, body: body ? JSON.stringify(body) : undefined});
  } catch (e) {  // no answer at all: the server is down or the network is gone
    throw new Error(UNREACHABLE);
  }
  let data = {};
  try { data = await response.json(); } catch (e) { /* not JSON: keep the status */ }
  if (response.status === 401) tokenForm.hidden = false;
  if (!response.ok) {
    const proxy = !data.error && response.status >= 502 && response.status <= 504;  // a proxy, no bot behind it
    throw new Error(proxy ? UNREACHABLE : data.error || ("The server answered " + response.status + "."));
  }
  return data;
}

async function loadHistory() {
  log.replaceChildren(welcome);
  try {
    const data = await api("GET", "/api/history?conversation=" + encodeURIComponent(conversationId()));
    for (const exchange of data.exchanges) {
      show("user", exchange.user);
      addActions(show("bot", exchange.bot), exchange.id);
    }
  } catch (error) {
    show("error", error.message);
  }
}

chatForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = textInput.value;
  if (!text.trim()) return;
  textInput.value = "";
  show("user", text);
  const thinking = show("bot thinking", "thinking…");
  sendButton.disabled = true;
  try {
    const data = await api("POST", "/api/chat", {conversation: conversationId(), text});
    thinking.className = "msg bot";
    thinking.textContent = data.reply;
    if (data.exchange_id) addActions(thinking, data.exchange_id);  // none for a deflection: nothing stored
  } catch (error) {
    thinking.className = "msg error";
    thinking.textContent = error.message;
    if (!textInput.value) textInput.value = text;  // nothing typed is lost: edit it or send it again
  } finally {
    sendButton.disabled = false;
    textInput.focus();
  }
});

tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem("blenderchat.token", document.getElementById("token").value.trim());
  tokenForm.hidden = true;
  loadHistory();
});

document.getElementById("reset").addEventListener("click", async () => {
  try { await api("POST", "/api/reset", {conversation: conversationId()}); } catch (error) { /* start afresh anyway */ }
  localStorage.removeItem("blenderchat.conversation");
  loadHistory();
});

loadHistory();
