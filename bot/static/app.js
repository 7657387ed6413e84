// The web chat: talks to /api/chat, /api/history and /api/reset. The conversation id
// (and the API token, when the server needs one) are kept in this browser's localStorage.
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
      show("bot", exchange.bot);
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
