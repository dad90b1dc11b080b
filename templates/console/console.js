// The console's one script. Pages are rendered by the gateway; every
// change is a call to the admin API (same origin, the browser's client
// certificate), and a refusal shows the API's problem details next to the
// field at fault (the last segment of each error's JSON pointer names the
// input's data-field) or under the form.
"use strict";

(function () {
  const body = document.body;
  const text = (key) => body.dataset[key] || "";

  async function call(method, path, payload, contentType) {
    const init = { method, headers: { accept: "application/json" }, credentials: "same-origin" };
    if (payload !== undefined) {
      init.headers["content-type"] = contentType || "application/json";
      init.body = JSON.stringify(payload);
    }
    const resp = await fetch(path, init);
    let doc = null;
    try { doc = await resp.json(); } catch (_) { doc = null; }
    return { ok: resp.ok, status: resp.status, doc };
  }

  function clearProblems(scope) {
    scope.querySelectorAll(".field-error").forEach((e) => e.remove());
    scope.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
    scope.querySelectorAll(".outcome").forEach((e) => { e.textContent = ""; e.className = "outcome"; });
  }

  // Shows a problem document in `scope`: each error next to its input when
  // one matches, the problem itself in the scope's outcome box.
  function showProblem(scope, status, doc) {
    const outcome = scope.querySelector(".outcome");
    const problem = doc || { title: String(status), detail: "", code: "" };
    if (outcome) {
      outcome.className = "outcome problem";
      outcome.textContent = "";
      const head = document.createElement("strong");
      head.textContent = `${problem.status || status} ${problem.title || ""}`;
      const detail = document.createElement("span");
      detail.className = "detail";
      detail.textContent = ` ${problem.detail || ""} `;
      const code = document.createElement("code");
      code.className = "problem-code";
      code.textContent = problem.code || "";
      outcome.append(head, detail, `${text("code")}: `, code);
      if (Array.isArray(problem.changes)) {
        const list = document.createElement("ul");
        for (const c of problem.changes) {
          const li = document.createElement("li");
          li.textContent = `${c.change} ${c.field}: ${c.detail}`;
          list.append(li);
        }
        outcome.append(list);
      }
    }
    for (const e of (problem.errors || [])) {
      const last = String(e.pointer || "").split("/").pop();
      const input = last && scope.querySelector(`[data-field="${CSS.escape(last)}"]`);
      const note = document.createElement("span");
      note.className = "field-error";
      note.setAttribute("role", "alert");
      note.dataset.pointer = e.pointer || "";
      note.textContent = e.message || e.code || "";
      if (input) {
        input.setAttribute("aria-invalid", "true");
        input.insertAdjacentElement("afterend", note);
      } else if (outcome) {
        const line = document.createElement("div");
        line.append(note, " ");
        const ptr = document.createElement("code");
        ptr.textContent = e.pointer || "";
        line.append(ptr);
        outcome.append(line);
      }
    }
  }

  function showDone(scope, message) {
    const outcome = scope.querySelector(".outcome");
    if (outcome) {
      outcome.className = "outcome done";
      outcome.textContent = message || text("done");
    }
  }

  const scopeOf = (el) => el.closest("form, section, main") || document.body;

  // Buttons that call the API: data-api="METHOD /path", optional data-body
  // (JSON), data-reason-from (an input whose text, when given, is sent as
  // the reason of a forced change), data-then (reload | remove-row).
  document.addEventListener("click", async (ev) => {
    const button = ev.target.closest("button[data-api]");
    if (!button) return;
    ev.preventDefault();
    const scope = scopeOf(button);
    clearProblems(scope);
    const [method, path] = button.dataset.api.split(" ");
    let payload = button.dataset.body ? JSON.parse(button.dataset.body) : undefined;
    const reasonInput = button.dataset.reasonFrom && document.getElementById(button.dataset.reasonFrom);
    if (reasonInput && reasonInput.value.trim()) {
      payload = Object.assign(payload || {}, { force: true, reason: reasonInput.value.trim() });
    }
    button.disabled = true;
    const label = button.textContent;
    button.textContent = text("working");
    try {
      const r = await call(method, path, payload);
      if (!r.ok) { showProblem(scope, r.status, r.doc); return; }
      if (button.dataset.then === "reload") { window.location.reload(); return; }
      if (button.dataset.then === "remove-row") {
        const row = button.closest("tr");
        if (row) row.remove();
      }
      showDone(scope);
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  });

  // === the field form (catalog item page) ===
  const fieldForm = document.getElementById("field-form");
  if (fieldForm) {
    const item = fieldForm.dataset.item;
    const required = JSON.parse(fieldForm.dataset.required || "[]") || [];
    const activate = document.getElementById("field-activate");
    const value = (id) => document.getElementById(id).value.trim();

    // A JSON Merge Patch (RFC 7396) of the active definition that adds or
    // changes one field.
    function patch() {
      const name = value("field-name");
      const field = { type: value("field-type"), "x-class": value("field-class") };
      if (value("field-zh")) field["x-zh"] = value("field-zh");
      if (value("field-max-length")) field.maxLength = Number(value("field-max-length"));
      if (value("field-description")) field.description = value("field-description");
      const doc = { schema: { properties: { [name]: field } } };
      const want = document.getElementById("field-required").checked;
      const has = required.includes(name);
      if (want !== has) {
        doc.schema.required = want ? required.concat([name]) : required.filter((f) => f !== name);
      }
      return doc;
    }

    function showClassification(change) {
      const box = document.getElementById("classification");
      const verdict = document.getElementById("classification-verdict");
      const list = document.getElementById("changes");
      box.hidden = false;
      verdict.textContent = change.breaking ? verdict.dataset.breaking : verdict.dataset.compatible;
      verdict.className = change.breaking ? "bad" : "good";
      list.textContent = "";
      for (const c of change.changes || []) {
        const li = document.createElement("li");
        const code = document.createElement("code");
        code.className = "change";
        code.textContent = c.change;
        li.append(code, ` ${c.field}: ${c.detail}`);
        if (c.breaking) li.className = "bad";
        list.append(li);
      }
      if (!(change.changes || []).length) list.textContent = list.dataset.none;
    }

    // Any edit invalidates the last check.
    fieldForm.addEventListener("input", (ev) => {
      if (ev.target.id !== "field-reason") activate.disabled = true;
    });

    fieldForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const mode = ev.submitter ? ev.submitter.value : "check";
      clearProblems(fieldForm);
      const doc = patch();
      const path = `/admin/v1/catalog/items/${encodeURIComponent(item)}`;
      if (mode === "check") {
        const r = await call("PATCH", `${path}?dry_run=true`, doc, "application/merge-patch+json");
        if (!r.ok) { showProblem(fieldForm, r.status, r.doc); return; }
        showClassification(r.doc);
        activate.disabled = false;
        return;
      }
      const reason = value("field-reason");
      if (reason) Object.assign(doc, { force: true, reason });
      const r = await call("PATCH", path, doc, "application/merge-patch+json");
      if (!r.ok) { showProblem(fieldForm, r.status, r.doc); return; }
      showClassification(r.doc);
      showDone(fieldForm, `${text("done")}: v${r.doc.version}`);
      window.setTimeout(() => window.location.reload(), 800);
    });

    // "Edit" in the field table fills the form with that field.
    document.querySelectorAll("[data-edit-field]").forEach((b) => b.addEventListener("click", () => {
      document.getElementById("field-name").value = b.dataset.editField;
      document.getElementById("field-zh").value = b.dataset.zh;
      if (b.dataset.type) document.getElementById("field-type").value = b.dataset.type;
      if (b.dataset.class) document.getElementById("field-class").value = b.dataset.class;
      document.getElementById("field-max-length").value = b.dataset.maxLength;
      document.getElementById("field-required").checked = b.dataset.required === "true";
      activate.disabled = true;
      fieldForm.scrollIntoView();
    }));
  }

  // === the subscription form ===
  const subscriptionForm = document.getElementById("subscription-form");
  if (subscriptionForm) {
    const field = (id) => document.getElementById(id).value.trim();
    subscriptionForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearProblems(subscriptionForm);
      const id = field("subscription-id");
      const doc = {
        agency: field("subscription-agency"),
        mode: field("subscription-mode"),
        items: Array.from(document.getElementById("subscription-items").selectedOptions, (o) => o.value),
      };
      for (const [key, input] of [["endpoint", "subscription-endpoint"], ["ca_file", "subscription-ca-file"],
        ["signing_secret", "subscription-secret"]]) {
        if (field(input)) doc[key] = field(input);
      }
      const r = await call("PUT", `/admin/v1/subscriptions/${encodeURIComponent(id)}`, doc);
      if (!r.ok) { showProblem(subscriptionForm, r.status, r.doc); return; }
      showDone(subscriptionForm);
      window.setTimeout(() => window.location.reload(), 800);
    });
  }

  // === the participant form ===
  const participantForm = document.getElementById("participant-form");
  if (participantForm) {
    const field = (id) => document.getElementById(id);
    participantForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearProblems(participantForm);
      const id = field("participant-id").value.trim();
      const doc = {
        id,
        kind: field("participant-kind").value,
        name: field("participant-name").value.trim(),
        name_zh: field("participant-name-zh").value.trim(),
        clearance: field("participant-clearance").value,
        certificate_sha256: field("participant-pins").value.split(/\s+/).filter(Boolean),
        enabled: true,
      };
      if (field("participant-region").value.trim()) doc.region = field("participant-region").value.trim();
      if (participantForm.dataset.original) {
        // Keep what the form does not show (quota, implements, state).
        const original = JSON.parse(participantForm.dataset.original);
        if (original.id === id) {
          for (const k of ["quota", "implements", "enabled"]) if (k in original) doc[k] = original[k];
        }
      }
      const r = await call("PUT", `/admin/v1/participants/${encodeURIComponent(id)}`, doc);
      if (!r.ok) { showProblem(participantForm, r.status, r.doc); return; }
      showDone(participantForm);
      window.setTimeout(() => window.location.reload(), 800);
    });
    document.querySelectorAll("[data-edit-participant]").forEach((b) => b.addEventListener("click", () => {
      const p = JSON.parse(b.dataset.editParticipant);
      participantForm.dataset.original = b.dataset.editParticipant;
      field("participant-id").value = p.id;
      field("participant-kind").value = p.kind;
      field("participant-name").value = p.name || "";
      field("participant-name-zh").value = p.name_zh || "";
      field("participant-clearance").value = p.clearance;
      field("participant-region").value = p.region || "";
      field("participant-pins").value = (p.certificate_sha256 || []).join("\n");
      participantForm.scrollIntoView();
    }));
  }
})();
