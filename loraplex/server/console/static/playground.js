// The playground: one message to two models at once, each answer streamed as it is generated.
// It reads the server-sent events of /v1/chat/completions (through /console/playground/chat)
// with fetch and a ReadableStream; every text goes in with textContent, never as markup.
"use strict";

function bubble(transcript, role, text) {
  const item = document.createElement("div");
  item.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role === "user" ? "You" : role === "error" ? "Error" : "Model";
  const body = document.createElement("p");
  body.textContent = text;
  item.append(who, body);
  transcript.append(item);
  return body;
}

async function ask(url, csrf, payload, transcript) {
  const out = bubble(transcript, "assistant", "");
  let response;
  try {
    response = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify(payload),
    });
  } catch (e) {
    out.parentElement.className = "msg error";
    out.textContent = `network error: ${e}`;
    return "";
  }
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    out.parentElement.className = "msg error";
    out.textContent = message;
    return "";
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        out.parentElement.className = "msg error";
        out.textContent = chunk.error.message;
        continue;
      }
      for (const choice of chunk.choices || []) {
        text += (choice.delta && choice.delta.content) || "";
      }
      out.textContent = text;
    }
  }
  out.parentElement.dataset.done = "true";
  return text;
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("playground");
  if (!form) return;
  const csrf = document.body.dataset.csrf;
  const histories = {a: [], b: []};
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const prompt = form.elements.prompt.value.trim();
    if (!prompt) return;
    const button = form.querySelector('button[type="submit"]');
    button.disabled = true;
    await Promise.all(["a", "b"].map(async (side) => {
      const pane = form.querySelector(`[data-pane="${side}"]`);
      const transcript = pane.querySelector(".transcript");
      histories[side].push({role: "user", content: prompt});
      bubble(transcript, "user", prompt);
      const answer = await ask(form.dataset.url, csrf, {
        tenant: form.dataset.tenant, model: form.elements[`model-${side}`].value,
        messages: histories[side], max_tokens: Number(form.elements.max_tokens.value),
        temperature: Number(form.elements.temperature.value),
      }, transcript);
      histories[side].push({role: "assistant", content: answer});
    }));
    form.elements.prompt.value = "";
    button.disabled = false;
    form.elements.prompt.focus();
  });
  form.querySelector("[data-clear]").addEventListener("click", () => {
    histories.a = []; histories.b = [];
    form.querySelectorAll(".transcript").forEach((t) => t.replaceChildren());
  });
});
