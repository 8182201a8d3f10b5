// ICH triage web: local times, live worklist, feedback buttons, key image toggle. No external code.
(function () {
  "use strict";
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach((el) => {
      const d = new Date(el.getAttribute("datetime"));
      if (!isNaN(d)) { el.textContent = d.toLocaleString(); el.title = d.toISOString(); }
    });
  }

  function reasons() {
    try { return JSON.parse((document.querySelector('meta[name="feedback-reasons"]') || {}).content || "{}"); }
    catch (e) { return {}; }
  }

  function closeReason() { document.querySelectorAll(".reason-box").forEach((b) => b.remove()); }

  function openReason(button) {
    // Agree / Disagree: an optional reason (list) and free text before the verdict is saved.
    closeReason();
    const box = document.createElement("div");
    box.className = "reason-box";
    box.setAttribute("role", "group");
    box.setAttribute("aria-label", `Reason to ${button.dataset.action}`);
    const sel = document.createElement("select");
    sel.id = "fb-reason";
    sel.append(new Option("Reason (optional)", ""));
    (reasons()[button.dataset.action] || []).forEach(([code, text]) => sel.append(new Option(text, code)));
    const text = document.createElement("input");
    text.id = "fb-comment"; text.maxLength = 1000; text.placeholder = "Comment (optional)";
    const save = document.createElement("button");
    save.type = "button"; save.id = "fb-save"; save.className = "primary";
    save.textContent = button.dataset.action === "agree" ? "Save agree" : "Save disagree";
    const cancel = document.createElement("button");
    cancel.type = "button"; cancel.id = "fb-cancel"; cancel.textContent = "Cancel";
    save.addEventListener("click", () => { sendFeedback(button, { reason: sel.value, comment: text.value }); closeReason(); });
    cancel.addEventListener("click", closeReason);
    box.append(sel, text, save, cancel);
    (button.closest("td, .study-actions") || button.parentNode).append(box);
    sel.focus();
  }

  async function sendFeedback(button, extra) {
    const studyId = button.dataset.studyId;
    const action = button.dataset.action;
    button.disabled = true;
    try {
      const resp = await fetch(`/studies/${studyId}/feedback`, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf(), "Accept": "application/json" },
        body: JSON.stringify(Object.assign({ action: action }, extra || {})),
      });
      const body = await resp.json().catch(() => ({}));
      if (!resp.ok) { alert(body.error || `Could not save (${resp.status})`); return; }
      const box = button.closest("tr, .study-actions");
      box.querySelectorAll("button.fb").forEach((b) => b.classList.toggle("chosen", b === button));
      const state = box.querySelector(".fb-state");
      if (state) state.textContent = `${body.feedback.action} · ${body.feedback.user}`;
      const table = document.getElementById("worklist");
      if (box.tagName === "TR" && table && table.dataset.view === "to-read") {
        box.remove(); // read now: it leaves the "to read" view
        const n = document.getElementById("to-read-count");
        if (n) n.textContent = String(Math.max(0, parseInt(n.textContent, 10) - 1));
      }
      pollAlerts();
    } finally { button.disabled = false; }
  }

  document.addEventListener("click", (ev) => {
    const fb = ev.target.closest("button.fb");
    if (fb) {
      ev.preventDefault();
      if (fb.dataset.action in reasons()) openReason(fb); else sendFeedback(fb);
      return;
    }
    const mode = ev.target.closest("button.mode");
    if (mode) {
      document.querySelectorAll("button.mode").forEach((b) => b.classList.toggle("chosen", b === mode));
      document.querySelectorAll("img.keyimage").forEach((img) => {
        const src = img.dataset[mode.dataset.mode];
        if (src) img.src = src;
      });
    }
  });

  function startWorklist(table) {
    const body = document.getElementById("worklist-body");
    const period = parseInt(table.dataset.pollMs || "5000", 10);
    const dot = document.getElementById("live-dot");
    const updated = document.getElementById("updated");
    const stamp = () => { updated.textContent = new Date().toLocaleTimeString(); };
    stamp();
    async function poll() {
      try {
        const query = table.dataset.query ? `?${table.dataset.query}` : "";
        const resp = await fetch(`/worklist/rows${query}`, { credentials: "same-origin", headers: { "Accept": "text/html" } });
        if (resp.redirected || resp.status === 401) { window.location = "/login"; return; }
        if (!resp.ok) throw new Error(String(resp.status));
        const html = await resp.text();
        const before = new Set([...body.querySelectorAll("tr[data-study-id]")].map((r) => r.dataset.studyId));
        if (document.activeElement && body.contains(document.activeElement)) return; // do not yank a focused button
        if (body.querySelector(".reason-box")) return; // nor a reason being typed
        body.innerHTML = html;
        const toRead = resp.headers.get("X-To-Read");
        const count = document.getElementById("to-read-count");
        if (count && toRead !== null) count.textContent = toRead;
        body.querySelectorAll("tr[data-study-id]").forEach((r) => {
          if (!before.has(r.dataset.studyId)) r.classList.add("fresh");
        });
        localTimes(body);
        dot.classList.remove("down");
        stamp();
      } catch (e) {
        dot.classList.add("down");
      } finally {
        setTimeout(poll, period);
      }
    }
    setTimeout(poll, period);
  }

  // ---- alerts: title count, browser notification and sound for flagged studies nobody has read
  const alertState = { known: null, baseTitle: "", timer: null };
  const soundOn = () => localStorage.getItem("triage.sound") !== "off";
  let audio = null;

  function beep() {
    try {
      audio = audio || new (window.AudioContext || window.webkitAudioContext)();
      const o = audio.createOscillator(), g = audio.createGain();
      o.type = "sine"; o.frequency.value = 880;
      g.gain.setValueAtTime(0.0001, audio.currentTime);
      g.gain.exponentialRampToValueAtTime(0.25, audio.currentTime + 0.02);
      g.gain.exponentialRampToValueAtTime(0.0001, audio.currentTime + 0.6);
      o.connect(g).connect(audio.destination);
      o.start(); o.stop(audio.currentTime + 0.65);
      window.__alertSounds = (window.__alertSounds || 0) + 1;
    } catch (e) { /* no audio output */ }
  }

  function notify(study) {
    if (!("Notification" in window) || Notification.permission !== "granted") return;
    try {
      const n = new Notification(`Flagged: ${study.accession || "study " + study.id}`, {
        body: study.subtypes.length ? `Suspected ${study.subtypes.join(", ")}` : "Suspected hemorrhage",
        tag: `triage-study-${study.id}`, requireInteraction: true,
      });
      n.onclick = () => { window.focus(); window.location = `/studies/${study.id}`; };
    } catch (e) { /* notifications unavailable here (e.g. some mobile browsers) */ }
  }

  async function pollAlerts() {
    const bar = document.getElementById("alerts");
    if (!bar) return;
    try {
      const resp = await fetch("/alerts", { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!resp.ok) return;
      const body = await resp.json();
      const ids = new Set(body.studies.map((s) => s.id));
      if (alertState.known !== null) {
        const fresh = body.studies.filter((s) => !alertState.known.has(s.id));
        fresh.forEach(notify);
        if (fresh.length && soundOn()) beep();
        window.__alertsRaised = (window.__alertsRaised || 0) + fresh.length;
      }
      alertState.known = ids;
      document.title = body.count ? `(${body.count}) ${alertState.baseTitle}` : alertState.baseTitle;
      const count = document.getElementById("alert-count");
      count.textContent = String(body.count);
      bar.classList.toggle("active", body.count > 0);
      bar.title = body.count ? `Unread flagged: ${body.studies.map((s) => s.accession).join(", ")}` : "No unread flagged studies";
    } catch (e) { /* offline: try again */ }
  }

  function startAlerts(bar) {
    alertState.baseTitle = document.title;
    const period = parseInt(bar.dataset.pollMs || "2000", 10);
    const sound = document.getElementById("sound-toggle");
    const showSound = () => { sound.textContent = soundOn() ? "Sound on" : "Sound off"; sound.setAttribute("aria-pressed", String(soundOn())); };
    sound.addEventListener("click", () => { localStorage.setItem("triage.sound", soundOn() ? "off" : "on"); showSound(); });
    showSound();
    const perm = document.getElementById("notify-enable");
    const showPerm = () => { perm.hidden = !("Notification" in window) || Notification.permission !== "default"; };
    perm.addEventListener("click", () => { Notification.requestPermission().then(showPerm); if (soundOn()) beep(); });
    showPerm();
    pollAlerts();
    alertState.timer = setInterval(pollAlerts, period);
  }

  document.addEventListener("DOMContentLoaded", () => {
    localTimes(document);
    const bar = document.getElementById("alerts");
    if (bar) startAlerts(bar);
    const table = document.getElementById("worklist");
    if (table) startWorklist(table);
    document.querySelectorAll(".bar .fill[data-fraction]").forEach((el) => {
      const f = parseFloat(el.dataset.fraction);
      if (!isNaN(f)) el.style.width = `${Math.min(100, Math.max(0, 100 * f)).toFixed(1)}%`;
    });
  });
})();
