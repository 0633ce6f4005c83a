// fastdecode playground: a chat over this server's /v1/chat/completions (streamed), each answer token
// marked by how it came. Model text only ever reaches the page through textContent.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "fastdecode.apiKey";
  const METHOD_STORE = "fastdecode.method";
  // Drafters that never propose a token themselves: no colour in the legend.
  const NO_COLOUR = new Set(["ar", "auto"]);

  const state = {
    model: null,
    messages: [],          // the conversation sent with each request: [{role, content}]
    controller: null,      // the AbortController of the answer streaming now
    showTokens: true,      // false once the server has refused show_tokens (then text comes unmarked)
    summaries: {},
    seen: new Set(),       // sources seen so far, bold in the legend
  };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function httpError(response) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      message = (body.error && body.error.message) || body.detail || message;
    } catch (_) { /* not JSON */ }
    const error = new Error(typeof message === "string" ? message : JSON.stringify(message));
    error.status = response.status;
    return error;
  }

  async function getJSON(path) {
    const response = await fetch(path, { headers: headers() });
    if (!response.ok) throw await httpError(response);
    return response.json();
  }

  // ---- setup: the model, the methods, the legend ----

  async function init() {
    try {
      const models = await getJSON("/v1/models");
      state.model = models.data[0].id;
      $("model").textContent = state.model;
      const methods = await getJSON("/v1/fastdecode/methods");
      fillMethods(methods.data);
      $("send").disabled = !!state.controller;
      clearNotice();
    } catch (error) {
      if (error.status === 401) {
        $("key-box").open = true;
        notice("This server needs an API key: enter it under API key.");
      } else {
        notice("Could not reach the server: " + error.message);
      }
    }
  }

  function fillMethods(methods) {
    const select = $("method");
    const keep = select.value || localStorage.getItem(METHOD_STORE) || "";
    select.replaceChildren(new Option("server default", ""));
    const legend = $("legend");
    legend.querySelectorAll(".item.drafter").forEach((node) => node.remove());
    for (const m of methods) {
      state.summaries[m.name] = m.summary + (m.lossless ? "" : " (not lossless: output may differ from plain decoding)");
      const option = new Option(m.lossless ? m.name : m.name + " (not lossless)", m.name);
      option.title = m.summary;
      select.add(option);
      if (!NO_COLOUR.has(m.name)) legend.append(legendItem(m.name, m.summary));
    }
    if ([...select.options].some((o) => o.value === keep)) select.value = keep;
    showSummary();
  }

  function legendItem(source, title) {
    const item = el("span", "item drafter");
    item.dataset.source = source;
    item.title = title || "";
    const swatch = el("span", "swatch tok drafted", source);
    swatch.dataset.source = source;
    item.append(swatch);
    return item;
  }

  function markSeen(source) {
    if (state.seen.has(source)) return;
    state.seen.add(source);
    const legend = $("legend");
    let item = [...legend.querySelectorAll(".item")].find((node) => node.dataset.source === source);
    if (!item && source !== "target") legend.append(item = legendItem(source, "a drafter this page has no colour for"));
    if (item) item.classList.add("seen");
  }

  function showSummary() {
    const m = $("method").value;
    $("method-summary").textContent = m ? `${m}: ${state.summaries[m] || ""}` : "The method the server was started with.";
  }

  function notice(text) {
    clearNotice();
    const node = el("p", "hint error", text);
    node.id = "notice";
    $("log").prepend(node);
  }

  function clearNotice() {
    const node = $("notice");
    if (node) node.remove();
  }

  // ---- the conversation ----

  function addMessage(role, label) {
    const empty = $("empty");
    if (empty) empty.remove();
    const node = el("div", "msg " + role);
    node.append(el("div", "who", label), el("div", "text"));
    $("log").append(node);
    return node;
  }

  function scrollDown(force) {
    const log = $("log");
    const near = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
    if (force || near) log.scrollTop = log.scrollHeight;
    if (force || near) window.scrollTo(0, document.body.scrollHeight);
  }

  // The answer's text comes from delta.content (the truth: stop strings may hold text back or cut it);
  // the tokens (fastdecode.tokens, each decoded alone) are laid over it in order. Where a token's
  // text is not found where expected (a character split across tokens), marking resumes at the next
  // token found just ahead; text no token covers yet is shown plain.
  function segments(text, tokens) {
    const out = [];
    let pos = 0;
    let i = 0;
    while (i < tokens.length && pos < text.length) {
      const t = tokens[i].text || "";
      if (!t) { i++; continue; }
      if (text.startsWith(t, pos)) {
        out.push([t, tokens[i].source]);
        pos += t.length;
        i++;
        continue;
      }
      const rest = text.slice(pos);
      if (t.startsWith(rest)) { out.push([rest, tokens[i].source]); pos = text.length; break; }
      let j = i + 1;
      let at = -1;
      for (; j < tokens.length && j < i + 8; j++) {
        const u = tokens[j].text || "";
        if (!u || u.includes("\uFFFD")) continue;
        at = text.indexOf(u, pos);
        if (at >= 0 && at - pos <= 16) break;
        at = -1;
      }
      if (at < 0) break;
      if (at > pos) {
        const group = tokens.slice(i, j);
        const source = group.every((g) => g.source !== "target") ? group[0].source : "target";
        out.push([text.slice(pos, at), source]);
      }
      pos = at;
      i = j;
    }
    if (pos < text.length) out.push([text.slice(pos), null]);
    return out;
  }

  class Answer {
    constructor() {
      this.node = addMessage("assistant streaming", "assistant");
      this.textNode = this.node.querySelector(".text");
      this.stats = el("div", "stats");
      this.node.append(this.stats);
      this.text = "";
      this.tokens = [];
      this.accepted = 0;   // tokens that came from an accepted draft
      this.targets = 0;    // the verifier's own tokens: one per forward pass that committed tokens
      this.start = performance.now();
      this.firstAt = null;
      this.end = null;
      this.final = null;   // the last chunk's fastdecode statistics
      this.usage = null;
      this.pending = false;
    }

    addText(text) {
      if (!text) return;
      if (this.firstAt === null) this.firstAt = performance.now();
      this.text += text;
      this.schedule();
    }

    addTokens(tokens) {
      for (const t of tokens) {
        const source = typeof t.source === "string" ? t.source : "target";
        this.tokens.push({ text: typeof t.text === "string" ? t.text : "", source });
        if (source === "target") this.targets++; else this.accepted++;
        markSeen(source);
      }
      if (tokens.length && this.firstAt === null) this.firstAt = performance.now();
      this.schedule();
    }

    schedule() {
      if (this.pending) return;
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.render(); });
    }

    render() {
      const fragment = document.createDocumentFragment();
      for (const [text, source] of segments(this.text, this.tokens)) {
        if (source === null) { fragment.append(document.createTextNode(text)); continue; }
        const span = el("span", source === "target" ? "tok" : "tok drafted", text);
        span.dataset.source = source;
        if (source !== "target") span.title = "accepted draft token from " + source;
        fragment.append(span);
      }
      this.textNode.replaceChildren(fragment);
      this.renderStats();
      scrollDown(false);
    }

    renderStats() {
      const now = this.end || performance.now();
      const seconds = (now - this.start) / 1000;
      const count = this.tokens.length || (this.usage ? this.usage.completion_tokens : 0);
      const f = this.final;
      const items = [];
      const stat = (name, label, value, title) => items.push([name, label, value, title]);
      stat("tokens", "tokens", count ? String(count) : "—");
      stat("tps", "tok/s", count && seconds > 0 ? (count / seconds).toFixed(1) : "—",
        "generated tokens per second, from sending the request");
      if (this.firstAt !== null) stat("ttft", "first token", ((this.firstAt - this.start) / 1000).toFixed(2) + " s");
      let mal = "—";
      if (f && typeof f.mean_acceptance_length === "number") mal = f.mean_acceptance_length.toFixed(2);
      else if (this.targets) mal = "~" + (1 + this.accepted / this.targets).toFixed(2);
      stat("mal", "mean acceptance length", mal, "tokens committed per verification of a draft (1 + accepted / drafts)");
      let rate = this.tokens.length ? `${this.accepted} accepted / — drafted` : "—";
      if (f && typeof f.draft_tokens === "number") {
        rate = `${f.accepted_tokens} / ${f.draft_tokens} drafted`;
        if (f.draft_tokens) rate += ` (${(100 * f.accepted_tokens / f.draft_tokens).toFixed(0)}%)`;
      }
      stat("rate", "acceptance", rate, "accepted draft tokens / drafted tokens");
      if (f && typeof f.forward_passes === "number") stat("passes", "forward passes", String(f.forward_passes));
      if (f && f.method) stat("method", "method", f.method);
      this.stats.replaceChildren(...items.map(([name, label, value, title]) => {
        const node = el("span", "stat");
        node.dataset.stat = name;
        if (title) node.title = title;
        node.append(document.createTextNode(label + " "), el("b", "", value));
        return node;
      }));
    }

    finish(how, message) {
      this.end = performance.now();
      this.node.classList.remove("streaming");
      this.node.classList.add(how);
      this.node.dataset.state = how;
      if (message) this.node.append(el("div", how === "error" ? "error" : "note", message));
      this.render();
    }
  }

  // ---- sending and reading the stream ----

  function requestBody() {
    const temperature = Math.min(2, Math.max(0, parseFloat($("temperature").value) || 0));
    const maxTokens = Math.max(1, parseInt($("max-tokens").value, 10) || 256);
    const fastdecode = {};
    const method = $("method").value;
    if (method) fastdecode.method = method;
    if (state.showTokens) fastdecode.show_tokens = true;
    return {
      model: state.model, messages: state.messages, stream: true, stream_options: { include_usage: true },
      temperature, max_tokens: maxTokens, fastdecode,
    };
  }

  async function post(signal) {
    for (;;) {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal,
      });
      if (response.ok) return response;
      const error = await httpError(response);
      // A server without per-token provenance refuses show_tokens: ask again without it, text unmarked.
      if (response.status === 400 && state.showTokens && /show_tokens/.test(error.message)) {
        state.showTokens = false;
        continue;
      }
      throw error;
    }
  }

  function handleEvent(answer, data) {
    if (data === "[DONE]") return true;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message || "generation failed");
    const choice = (chunk.choices || [])[0];
    const fd = chunk.fastdecode;
    if (fd && Array.isArray(fd.tokens)) answer.addTokens(fd.tokens);
    if (choice && choice.delta && typeof choice.delta.content === "string") answer.addText(choice.delta.content);
    if (fd && "mean_acceptance_length" in fd) answer.final = fd;
    if (choice && choice.finish_reason) answer.finishReason = choice.finish_reason;
    if (chunk.usage) answer.usage = chunk.usage;
    return false;
  }

  async function readStream(response, answer) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (data && handleEvent(answer, data)) return;
      }
    }
  }

  async function send(text) {
    if (state.controller || !text.trim()) return;
    if (!state.model) await init();
    if (!state.model) return;
    addMessage("user", "you").querySelector(".text").textContent = text;
    const conversation = state.messages;  // "New chat" starts another; this answer still ends this one
    conversation.push({ role: "user", content: text });
    const answer = new Answer();
    scrollDown(true);
    const controller = new AbortController();
    state.controller = controller;
    $("send").disabled = true;
    $("stop").disabled = false;
    try {
      const response = await post(controller.signal);
      await readStream(response, answer);
      conversation.push({ role: "assistant", content: answer.text });
      const note = state.showTokens ? (answer.finishReason === "length" ? "stopped at max tokens" : "")
        : "this server sends no per-token provenance: the text is unmarked";
      answer.finish("done", note);
    } catch (error) {
      if (error.name === "AbortError") {
        if (answer.text) conversation.push({ role: "assistant", content: answer.text });
        else conversation.pop();
        answer.finish("stopped", "stopped");
      } else {
        conversation.pop();  // the question failed: leave it out of the conversation
        if (error.status === 401) $("key-box").open = true;
        answer.finish("error", error.message);
      }
    } finally {
      state.controller = null;
      $("send").disabled = false;
      $("stop").disabled = true;
      scrollDown(false);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", (event) => event.preventDefault());
    const key = $("api-key");
    key.value = localStorage.getItem(KEY_STORE) || "";
    key.addEventListener("change", () => {
      if (key.value.trim()) localStorage.setItem(KEY_STORE, key.value.trim());
      else localStorage.removeItem(KEY_STORE);
      init();
    });
    $("method").addEventListener("change", () => {
      localStorage.setItem(METHOD_STORE, $("method").value);
      showSummary();
    });
    $("ask").addEventListener("submit", (event) => {
      event.preventDefault();
      const prompt = $("prompt");
      const text = prompt.value;
      if (!text.trim() || state.controller) return;
      prompt.value = "";
      send(text);
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("ask").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
    $("new-chat").addEventListener("click", () => {
      if (state.controller) state.controller.abort();
      state.messages = [];
      $("log").querySelectorAll(".msg").forEach((node) => node.remove());
    });
    init();
  });
})();
