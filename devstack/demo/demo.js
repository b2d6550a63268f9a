// Demo web client: uses only the connector's public API, as a product's front end would.
// The caller token comes from POST /demo/token, which only the dev host serves (a stand-in for
// the product's own back end, which would mint or forward its users' JWTs).
"use strict";

const SUB = "demo-user";
const $ = (id) => document.getElementById(id);
let token = null;
let accounts = [];
let tenants = [];
let nextCursor = null;
const seenIncoming = new Map(); // account id -> Set of message ids already shown
let lastEventAt = {};

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function linked(text) {
  // Text with its https URLs as links (an admin-consent URL in a hint is meant to be opened or copied).
  const out = [];
  let last = 0;
  for (const m of text.matchAll(/https:\/\/[^\s<>"']+/g)) {
    const url = m[0].replace(/[.,;:)]+$/, "");
    out.push(text.slice(last, m.index), el("a", { href: url, target: "_blank", rel: "noopener noreferrer" }, url));
    last = m.index + url.length;
  }
  out.push(text.slice(last));
  return out;
}

function when(iso) {
  // Graph's times are UTC with up to seven fractional digits: show them in the viewer's time zone, to the minute.
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function sender(m) {
  // "from · received" under a message's subject, in the list and in incoming mail.
  return (m.from ? m.from.address || "" : "") + " · " + when(m.receivedDateTime);
}

function banner(kind, text, hint) {
  const b = $("banner");
  b.hidden = false;
  b.className = kind;
  b.replaceChildren(el("span", { "data-testid": "banner-text" }, text));
  if (hint) b.append(el("span", { class: "hint", "data-testid": "banner-hint" }, ...linked(hint)));
}

function showSandbox(doc) {
  // The sandbox this stack runs (SANDBOX_PORT may not be the default 8443).
  const el = document.getElementById("sandbox-url");
  if (el && doc && doc.sandbox) el.textContent = doc.sandbox;
}

async function getToken(force) {
  const saved = JSON.parse(sessionStorage.getItem("demoToken") || "null");
  showSandbox(saved);
  if (!force && saved && saved.exp > Date.now() / 1000 + 60) return saved.token;
  const r = await fetch("/demo/token", { method: "POST", headers: { "Content-Type": "application/json" },
                                         body: JSON.stringify({ sub: SUB }) });
  if (!r.ok) throw new Error("The dev host did not issue a caller token (is DEMO_ENABLED set?)");
  const doc = await r.json();
  showSandbox(doc);
  sessionStorage.setItem("demoToken", JSON.stringify(doc));
  return doc.token;
}

class ApiError extends Error {
  constructor(problem) {
    super(problem.detail || problem.title || "Request failed");
    this.problem = problem;
  }
}

async function api(method, path, body) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const headers = { Authorization: "Bearer " + token };
    let payload = body;
    if (body && !(body instanceof FormData)) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
    const r = await fetch(path, { method, headers, body: payload });
    if (r.status === 401 && attempt === 0) { token = await getToken(true); continue; }
    if (r.status === 204) return null;
    const type = r.headers.get("Content-Type") || "";
    const doc = type.includes("json") ? await r.json() : { title: await r.text() };
    if (!r.ok) throw new ApiError(Object.assign({ status: r.status }, doc));
    return doc;
  }
}

function showProblem(err, where) {
  const p = err.problem || {};
  const text = (p.title ? p.title + ": " : "") + (p.detail || err.message) + (p.code ? " (" + p.code + ")" : "");
  if (where) { where.className = "error-text"; where.textContent = text + (p.hint ? " — " + p.hint : ""); }
  else banner("error", text, p.hint);
}

function selected() {
  const id = sessionStorage.getItem("demoAccount");
  return accounts.find((a) => a.id === id) || accounts.find((a) => a.status === "active") || accounts[0] || null;
}

function select(id) {
  sessionStorage.setItem("demoAccount", id);
  render();
}

async function loadAccounts() {
  try {
    [accounts, tenants] = await Promise.all([api("GET", "/api/accounts").then((r) => r.accounts),
                                             api("GET", "/api/tenants").then((r) => r.tenants)]);
  } catch (e) { showProblem(e); accounts = []; tenants = []; }
  render();
}

async function startAdminConsent(ev) {
  // Team mailboxes: a tenant administrator grants the app's application permissions (admin consent).
  ev.preventDefault();
  const q = new URLSearchParams({ returnUrl: location.origin + location.pathname });
  if ($("tenant").value.trim()) q.set("tenant", $("tenant").value.trim());
  try {
    const start = await api("GET", "/api/connect/microsoft/admin?" + q);
    location.assign(start.authUrl); // Entra's (the sandbox's) admin-consent page
  } catch (e) { showProblem(e); }
}

async function addMailbox(t, input) {
  try {
    const acc = await api("POST", `/api/tenants/${encodeURIComponent(t.id)}/mailboxes`, { address: input.value.trim() });
    sessionStorage.setItem("demoAccount", acc.id);
    banner("ok", "Team mailbox added: " + acc.email);
  } catch (e) { showProblem(e); }
  await loadAccounts();
}

async function disconnectTenant(t) {
  try { await api("DELETE", `/api/tenants/${encodeURIComponent(t.id)}`); banner("ok", "Tenant disconnected"); }
  catch (e) { showProblem(e); }
  await loadAccounts();
}

function renderTenants() {
  const rows = tenants.map((t) => {
    const input = el("input", { type: "email", class: "mailbox-address", "data-testid": "mailbox-address",
                                placeholder: "support@contoso.onmicrosoft.com" });
    return el("tr", { "data-tenant-id": t.id },
      el("td", {}, t.tenantId), el("td", { class: "status status-" + t.status }, t.status), el("td", {}, t.mailboxCount),
      el("td", {}, input, el("button", { type: "button", class: "small add-mailbox", "data-testid": "add-mailbox",
                                         onclick: () => addMailbox(t, input) }, "Add")),
      el("td", {}, el("button", { type: "button", class: "small", onclick: () => disconnectTenant(t) }, "Disconnect")));
  });
  $("tenants").tBodies[0].replaceChildren(...rows);
  $("no-tenants").hidden = tenants.length > 0;
}

function render() {
  const sel = selected();
  const rows = accounts.map((a) => el("tr", { class: sel && sel.id === a.id ? "selected" : "", "data-account-id": a.id },
    el("td", { class: "email" }, a.email), el("td", {}, a.displayName),
    el("td", { class: "type" }, a.accessType === "application" ? "team mailbox" : a.accountType),
    el("td", { class: "status status-" + a.status }, a.status === "active" ? "active" : "re-connect needed"),
    el("td", { class: "last-error" }, a.lastError ? a.lastError.code + ": " + a.lastError.message : ""),
    el("td", {},
      el("button", { type: "button", class: "use", onclick: () => select(a.id) }, "Use"),
      el("button", { type: "button", class: "refresh", onclick: () => refreshAccount(a) }, "Refresh"),
      a.accessType === "application" ? "" :
        el("button", { type: "button", class: "reconnect", onclick: () => startConnect(a.id) }, "Re-connect"),
      el("button", { type: "button", class: "disconnect", onclick: () => disconnect(a) }, "Disconnect"))));
  $("accounts").tBodies[0].replaceChildren(...rows);
  renderTenants();
  $("no-accounts").hidden = accounts.length > 0;
  $("send").disabled = $("load-messages").disabled = !sel;
  $("send-as").textContent = $("read-as").textContent = sel ? "as " + sel.email : "";
}

async function startConnect(accountId) {
  const q = new URLSearchParams({ returnUrl: location.origin + location.pathname });
  const hint = $("login-hint").value.trim();
  // With a hint, only that account may connect (a forwarded link cannot attach someone else's mailbox).
  if (hint) { q.set("loginHint", hint); q.set("requireLoginHint", "true"); }
  if ($("prompt").value) q.set("prompt", $("prompt").value);
  if (accountId) q.set("accountId", accountId);
  try {
    const start = await api("GET", "/api/connect/microsoft?" + q);
    location.assign(start.authUrl); // the Microsoft (sandbox) sign-in page
  } catch (e) { showProblem(e); }
}

let popup = null;

async function startPopup() {
  // Without returnUrl the callback renders a small result page that posts the result to its opener
  // (only to the origins of ALLOWED_RETURN_URLS) — the pattern for popups and Office dialogs.
  const q = new URLSearchParams();
  const hint = $("login-hint").value.trim();
  if (hint) { q.set("loginHint", hint); q.set("requireLoginHint", "true"); }
  if ($("prompt").value) q.set("prompt", $("prompt").value);
  popup = window.open("about:blank", "outlook-connect", "width=560,height=680");
  try {
    const start = await api("GET", "/api/connect/microsoft?" + q);
    popup.location.href = start.authUrl;
  } catch (e) { popup.close(); showProblem(e); }
}

window.addEventListener("message", async (ev) => {
  // The result page is served by the connector; accept its messages only.
  if (ev.origin !== location.origin || !ev.data || ev.data.type !== "outlook-connector/connect") return;
  if (popup) popup.close();
  if (ev.data.status === "connected") {
    sessionStorage.setItem("demoAccount", ev.data.accountId);
    banner("ok", "Mailbox connected (popup).");
  } else {
    banner("error", "Could not connect the mailbox: " + (ev.data.message || "unknown error"),
           (ev.data.hint ? ev.data.hint + " " : "") + "(error code: " + ev.data.code + ")");
  }
  await loadAccounts();
});

async function refreshAccount(a) {
  try { await api("POST", `/api/accounts/${encodeURIComponent(a.id)}/refresh`); banner("ok", "Tokens refreshed for " + a.email); }
  catch (e) { showProblem(e); }
  await loadAccounts();
}

async function disconnect(a) {
  try { await api("DELETE", `/api/accounts/${encodeURIComponent(a.id)}`); banner("ok", "Disconnected " + a.email); }
  catch (e) { showProblem(e); }
  await loadAccounts();
}

async function send(ev) {
  ev.preventDefault();
  const a = selected();
  const out = $("send-result");
  out.className = ""; out.textContent = "Sending…";
  const message = { to: $("send-to").value.split(",").map((s) => s.trim()).filter(Boolean),
                    subject: $("send-subject").value, bodyText: $("send-body").value };
  // multipart/form-data: a JSON part named "message" and raw file parts (no base64 overhead).
  const form = new FormData();
  form.append("message", JSON.stringify(message));
  for (const f of $("send-file").files) form.append("file", f, f.name);
  try {
    const r = await api("POST", `/api/accounts/${encodeURIComponent(a.id)}/send`, form);
    out.className = "ok-text";
    out.textContent = `Sent at ${when(r.sentAt)} (tracking id ${r.trackingId})` +
      ($("send-file").files.length ? ` with ${$("send-file").files[0].name}` : "");
  } catch (e) { showProblem(e, out); }
}

async function loadMessages(ev, more) {
  if (ev) ev.preventDefault();
  const a = selected();
  const q = new URLSearchParams({ folder: $("folder").value, top: "10" });
  if (more && nextCursor) q.set("cursor", nextCursor);
  try {
    const r = await api("GET", `/api/accounts/${encodeURIComponent(a.id)}/messages?` + q);
    const items = r.messages.map((m) => el("li", { class: m.isRead ? "read" : "unread", "data-message-id": m.id },
      el("div", { class: "subject" }, m.subject || "(no subject)"),
      el("div", { class: "muted" }, sender(m) + (m.hasAttachments ? " · 📎" : "")),
      el("div", { class: "preview" }, m.bodyPreview || ""),
      el("button", { type: "button", class: "small open", "data-testid": "open",
                     onclick: (ev) => openMessage(ev.target.closest("li"), a, m) }, "Open"),
      el("button", { type: "button", class: "small reply", "data-testid": "reply",
                     onclick: (ev) => openReply(ev.target.closest("li"), a, m) }, "Reply")));
    if (more) $("messages").append(...items); else $("messages").replaceChildren(...items);
    if (!items.length && !more) $("messages").replaceChildren(el("li", { class: "muted" }, "No messages."));
    nextCursor = r.nextCursor;
    $("more-messages").hidden = !nextCursor;
  } catch (e) { showProblem(e); }
}

async function openMessage(li, a, m) {
  // The whole message: GET …/messages/{id}. An HTML body is shown as its text (parsed into an inert document,
  // never inserted as markup), so a message cannot run script or load images in this page.
  const shown = li.querySelector(".body");
  if (shown) { shown.remove(); return; }
  const box = el("div", { class: "body", "data-testid": "message-body" }, "Loading…");
  li.querySelector(".preview").after(box);
  try {
    const d = await api("GET", `/api/accounts/${encodeURIComponent(a.id)}/messages/${encodeURIComponent(m.id)}`);
    let text = d.body.content;
    if (d.body.contentType === "html") {
      const doc = new DOMParser().parseFromString(text, "text/html");
      doc.querySelectorAll("script, style, head").forEach((n) => n.remove());
      doc.querySelectorAll("br").forEach((n) => n.replaceWith("\n"));
      doc.querySelectorAll("p, div, li, tr, h1, h2, h3").forEach((n) => n.append("\n"));
      text = doc.body.textContent.replace(/\n{3,}/g, "\n\n");
    }
    const names = (d.attachments || []).map((x) => x.name).join(", ");
    box.textContent = (text || "").trim() + (names ? "\n\nAttachments: " + names : "");
  } catch (e) { showProblem(e, box); }
}

function openReply(li, a, m) {
  // Answer in the same conversation: Graph keeps In-Reply-To, References and the conversation id.
  if (li.querySelector("form.reply-form")) return;
  const text = el("textarea", { rows: "3", "data-testid": "reply-text", required: "" });
  const out = el("p", { class: "muted", "data-testid": "reply-result", "aria-live": "polite" });
  const form = el("form", { class: "reply-form" },
    el("label", {}, "Reply to " + (m.from ? m.from.address || "" : ""), text),
    el("button", { type: "submit", "data-testid": "reply-send" }, "Send reply"), out);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    out.className = ""; out.textContent = "Sending…";
    try {
      const r = await api("POST", `/api/accounts/${encodeURIComponent(a.id)}/messages/` +
        `${encodeURIComponent(m.id)}/reply`, { comment: text.value });
      out.className = "ok-text";
      out.textContent = `Replied at ${when(r.sentAt)} (tracking id ${r.trackingId})`;
    } catch (e) { showProblem(e, out); }
  });
  li.append(form);
  text.focus();
}

function readConnectResult() {
  // The callback redirects back here with status=connected&accountId=…&result=… or status=error&code=…&message=…
  // A real product's back end verifies `result` against the session that started the connect
  // (docs/connect-security.md) before it trusts status=connected.
  const q = new URLSearchParams(location.search);
  if (!q.has("status")) return;
  if (q.get("status") === "connected" && q.has("tenantConnectionId")) {
    banner("ok", "Tenant connected: add its shared mailboxes below.");
  } else if (q.get("status") === "connected") {
    sessionStorage.setItem("demoAccount", q.get("accountId"));
    banner("ok", "Mailbox connected.");
  } else {
    banner("error", "Could not connect the mailbox: " + (q.get("message") || "unknown error"),
           (q.get("hint") ? q.get("hint") + " " : "") + "(error code: " + q.get("code") + ")");
  }
  history.replaceState(null, "", location.pathname);
}

// Incoming mail: poll the account (cheap) and, when its notifications report a new event (or every
// 15 s), the newest Inbox messages; show the ones not seen before. A product's back end would get a
// signed message.received webhook instead (docs/webhooks.md).
async function pollIncoming(tick) {
  const a = selected();
  $("incoming-as").textContent = a ? "for " + a.email : "";
  if (!a || document.hidden) return;
  try {
    const acc = await api("GET", `/api/accounts/${encodeURIComponent(a.id)}`);
    const n = acc.notifications || { status: "off" };
    $("incoming-status").textContent = `Inbox subscription: ${n.status}` +
      (n.expiresAt ? `, renewed before ${when(n.expiresAt)}` : "") + (n.lastEventAt ? `; last event ${when(n.lastEventAt)}` : "");
    const changed = n.lastEventAt !== lastEventAt[a.id];
    lastEventAt[a.id] = n.lastEventAt;
    if (!changed && tick % 5 !== 0 && seenIncoming.has(a.id)) return;
    const r = await api("GET", `/api/accounts/${encodeURIComponent(a.id)}/messages?folder=inbox&top=5`);
    const first = !seenIncoming.has(a.id);
    const seen = seenIncoming.get(a.id) || new Set();
    seenIncoming.set(a.id, seen);
    for (const m of r.messages.slice().reverse()) {
      if (seen.has(m.id)) continue;
      seen.add(m.id);
      if (first) continue; // what was there before the page looked is not "incoming"
      $("incoming").prepend(el("li", { class: "unread new", "data-message-id": m.id },
        el("div", { class: "subject" }, "New: " + (m.subject || "(no subject)")),
        el("div", { class: "muted" }, sender(m)),
        el("div", { class: "preview" }, m.bodyPreview || "")));
    }
  } catch (e) { $("incoming-status").textContent = "Incoming mail: " + (e.message || e); }
}

async function main() {
  readConnectResult();
  try {
    token = await getToken(false);
    $("who").textContent = `Signed in to the demo product as "${SUB}" (development caller token).`;
  } catch (e) { $("who").textContent = e.message; $("who").className = "error-text"; return; }
  $("connect-form").addEventListener("submit", (ev) => { ev.preventDefault(); startConnect(null); });
  $("connect-popup").addEventListener("click", startPopup);
  $("tenant-form").addEventListener("submit", startAdminConsent);
  $("reload-accounts").addEventListener("click", loadAccounts);
  $("send-form").addEventListener("submit", send);
  $("messages-form").addEventListener("submit", (ev) => loadMessages(ev, false));
  $("more-messages").addEventListener("click", () => loadMessages(null, true));
  await loadAccounts();
  const a = selected();
  if (a && !$("send-to").value) $("send-to").value = a.email;
  document.body.dataset.ready = "true";
  let tick = 0;
  pollIncoming(tick);
  setInterval(() => pollIncoming(++tick), 3000);
}

main();
