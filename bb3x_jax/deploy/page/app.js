// The chat page: every text goes into the page as textContent, never as HTML.
"use strict";

const state = { conversationId: null, userId: localStorage.getItem("user_pseudo_id"), reasons: [], busy: false };
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body || {}),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || `HTTP ${response.status}`);
  return data;
}

function showStatus(text) { $("status").textContent = text; }

function addMessage(sender, text) {
  const element = document.createElement("div");
  element.className = `message ${sender}`;
  element.textContent = text;
  $("messages").appendChild(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

function addBotMessage(messageId, text) {
  const element = $("bot-template").content.firstElementChild.cloneNode(true);
  element.dataset.messageId = messageId;
  element.querySelector(".text").textContent = text;
  const like = element.querySelector(".like"), dislike = element.querySelector(".dislike");
  const form = element.querySelector(".reasons"), choices = element.querySelector(".choices");
  const comment = element.querySelector(".comment"), rated = element.querySelector(".rated");
  for (const reason of state.reasons) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "radio";
    input.name = `reason-${messageId}`;
    input.value = reason.value;
    input.addEventListener("change", () => { comment.hidden = reason.value !== "other"; });
    label.append(input, ` ${reason.label}`);
    choices.appendChild(label);
  }
  const rate = async (rating, reason, note) => {
    try {
      await api(`/api/conversations/${state.conversationId}/feedback`,
                { message_id: messageId, rating, reason, comment: note || null });
      like.setAttribute("aria-pressed", String(rating === "like"));
      dislike.setAttribute("aria-pressed", String(rating === "dislike"));
      rated.textContent = rating === "like" ? "Thanks!" : "Thanks for the feedback.";
      form.hidden = true;
      showStatus("");
    } catch (error) { showStatus(error.message); }
  };
  like.addEventListener("click", () => rate("like", null));
  dislike.addEventListener("click", () => {
    form.hidden = false;
    form.scrollIntoView({ block: "nearest" });
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const chosen = form.querySelector("input[type=radio]:checked");
    rate("dislike", chosen ? chosen.value : null, comment.hidden ? null : comment.value.trim());
  });
  $("messages").appendChild(element);
  element.scrollIntoView({ block: "end" });
}

async function newConversation() {
  if (state.conversationId) {
    api(`/api/conversations/${state.conversationId}/end`).catch(() => {});
  }
  $("messages").replaceChildren();
  const body = state.userId ? { user_pseudo_id: state.userId } : {};
  const data = await api("/api/conversations", body);
  state.conversationId = data.conversation_id;
  state.userId = data.user_pseudo_id;
  localStorage.setItem("user_pseudo_id", state.userId);
  $("input").focus();
}

async function send(event) {
  event.preventDefault();
  const input = $("input"), text = input.value.trim();
  if (!text || state.busy) return;
  state.busy = true;
  $("send").disabled = true;
  addMessage("human", text);
  input.value = "";
  showStatus("…");
  try {
    const reply = await api(`/api/conversations/${state.conversationId}/messages`, { text });
    addBotMessage(reply.message_id, reply.text);
    showStatus("");
  } catch (error) {
    showStatus(error.message);
  } finally {
    state.busy = false;
    $("send").disabled = false;
    input.focus();
  }
}

async function start() {
  const response = await fetch("/api/settings");
  const settings = await response.json();
  state.reasons = settings.reasons;
  $("input").maxLength = settings.max_chars;
  if (settings.notice) {
    $("notice").textContent = settings.notice;
    $("notice").hidden = false;
  }
  $("composer").addEventListener("submit", send);
  $("new-conversation").addEventListener("click", () => newConversation().catch((e) => showStatus(e.message)));
  await newConversation();
}

start().catch((error) => showStatus(error.message));
