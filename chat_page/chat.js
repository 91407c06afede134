// The chat page of serve.py: talks to the same server's /v1/chat/completions with streaming.
// The history is kept here and sent with each message (when the server's format takes turns); Stop aborts the
// request, which frees its row on the server; Clear empties the history.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], multiTurn: true, model: null, controller: null };

function addMessage(role, text) {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  element.textContent = text;
  $("transcript").appendChild(element);
  $("transcript").scrollTop = $("transcript").scrollHeight;
  return element;
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) {
    result.Authorization = `Bearer ${key}`;
    localStorage.setItem("chatglm_api_key", key);
  }
  return result;
}

async function loadServerInfo() {
  const info = await (await fetch("/health")).json();
  state.model = info.model;
  state.multiTurn = info.multi_turn;
  $("model-info").textContent = `${info.model} · ${info.format} format`;
  $("temperature").value = info.defaults.temperature;
  $("top_p").value = info.defaults.top_p;
  $("max_tokens").value = Math.min(info.defaults.max_tokens, 512);
  $("api-key-field").hidden = !info.api_key_required;
  $("api_key").value = localStorage.getItem("chatglm_api_key") || "";
  $("format-note").textContent = info.multi_turn
    ? "多轮对话：每条消息带上之前的对话。Multi-turn: each message carries the conversation so far."
    : "任务格式：模型按训练时的单行格式回答每条消息，不带历史。Task format: each message is answered alone, as the model was trained.";
}

function readNumber(id, integer) {
  const value = integer ? parseInt($(id).value, 10) : parseFloat($(id).value);
  return Number.isFinite(value) ? value : undefined;
}

// Server-sent events: "data: {...}" lines separated by blank lines, "data: [DONE]" at the end.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text) {
  const messages = (state.multiTurn ? state.history : []).concat([{ role: "user", content: text }]);
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.dataset.state = "streaming";
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let answer = "";
  try {
    const body = { model: state.model, messages, stream: true, temperature: readNumber("temperature"),
                   top_p: readNumber("top_p"), max_tokens: readNumber("max_tokens", true) };
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                           body: JSON.stringify(body), signal: state.controller.signal });
    if (!response.ok) {
      const error = await response.json().catch(() => ({ error: { message: response.statusText } }));
      throw new Error(error.error.message);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      answer += chunk.choices[0].delta.content || "";
      reply.textContent = answer;
    }
    reply.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      reply.dataset.state = "stopped";
      reply.textContent = answer + " [已停止 stopped]";
    } else {
      reply.dataset.state = "error";
      reply.className = "message error";
      reply.textContent = `${answer}${answer ? "\n" : ""}${err.message}`;
    }
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  if (reply.dataset.state === "done" || reply.dataset.state === "stopped") {
    state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  state.history = [];
  $("transcript").replaceChildren();
});

loadServerInfo().catch((err) => { $("model-info").textContent = `cannot reach the server: ${err.message}`; });
