// hitl's own script, loaded as a file (the Content-Security-Policy forbids inline script).
// Progressive enhancement only; every form works without it. It:
//  - remembers the reviewer's name in localStorage,
//  - keeps a half-written comment when a live update (or a reconnect) redraws the form,
//  - shows whether the live stream is connected,
//  - keeps the dashboard's "age" column fresh.
// --- dashboard: review queue ------------------------------------------------------------
// Every title leads with how many tasks wait for review, "(3) Dashboard · hitl": the
// dashboard reads it from its stream's counts; any other page asks the list API for one
// row every POLL_MS while it is visible (its total is all it reads), so there is one way
// to learn it and no stream per page. The dashboard's stream updates rows in place and
// only announces new work (task-new): a bar counts it, and "show" reads the list anew.
(function () {
  "use strict";

  var POLL_MS = 10000;
  var fresh = new Set(); // announced tasks not on the page
  var showing = false; // the "show" link's request is on its way
  var moreFrom = null; // the row before "Load more": focus goes to what follows it
  var before = null; // the rows on the page while a fetched list is swapped in

  function titleCount(n) {
    var base = document.title.replace(/^\(\d+\) /, "");
    document.title = n > 0 ? "(" + n + ") " + base : base;
  }

  function countsShown() {
    var n = document.querySelector('#counts [data-count="waiting_for_review"] .count-n');
    if (n) titleCount(parseInt(n.textContent, 10) || 0);
  }

  function look() {
    var url = document.body.dataset.waitingUrl;
    if (!url || document.hidden) return;
    fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (body) {
        if (body && typeof body.total === "number") titleCount(body.total);
      })
      .catch(function () { /* offline for now: the next look tells */ });
  }

  function freshBar() {
    var link = document.querySelector(".fresh-link");
    if (!link) return;
    fresh.forEach(function (id) {
      if (document.getElementById("task-" + id)) fresh.delete(id); // loaded since
    });
    link.hidden = fresh.size === 0;
    link.textContent = fresh.size + (fresh.size === 1 ? " new task" : " new tasks") + " — show";
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (document.getElementById("counts")) return; // the dashboard: its stream tells
    window.setInterval(look, POLL_MS);
    document.addEventListener("visibilitychange", look);
  });

  document.addEventListener("htmx:sseMessage", function (event) {
    if (event.detail.type === "counts") countsShown();
    if (event.detail.type === "task-new") {
      fresh.add(String(event.detail.data).trim());
      freshBar();
    }
  });

  document.addEventListener("htmx:beforeRequest", function (event) {
    var elt = event.detail.elt;
    if (!elt.classList) return;
    if (elt.classList.contains("fresh-link")) showing = true;
    if (elt.classList.contains("more")) moreFrom = elt.closest("tr").previousElementSibling;
  });

  function listed() {
    return Array.prototype.slice.call(document.querySelectorAll("#task-rows tr[data-seq]"));
  }

  // A fetched list was read at some moment; the stream may have brought a row newer than
  // that meanwhile. Keep the newer of the two (by its last message), and a row already on
  // the page where it is (a task that came back for review may sort onto a later page).
  function reconcile() {
    var old = new Map();
    before.forEach(function (row) { old.set(row.id, row); });
    listed().forEach(function (row) {
      var kept = old.get(row.id);
      if (!kept || kept === row) return;
      if (document.body.contains(kept)) {
        row.remove();
      } else if (Number(kept.dataset.seq) > Number(row.dataset.seq)) {
        row.insertAdjacentHTML("afterend", kept.outerHTML);
        var newer = row.nextElementSibling;
        row.remove();
        htmx.process(newer);
      }
    });
  }

  document.addEventListener("htmx:beforeSwap", function (event) {
    var elt = event.detail.requestConfig && event.detail.requestConfig.elt;
    if (elt && elt.classList && (elt.classList.contains("fresh-link") ||
                                 elt.classList.contains("more"))) before = listed();
  });

  document.addEventListener("htmx:afterSwap", function () {
    if (before) {
      reconcile();
      before = null;
    }
    if (showing) {
      showing = false;
      fresh.clear();
      var list = document.getElementById("task-list");
      if (list) list.focus(); // the link it came from is hidden now
    }
    if (moreFrom) {
      var first = moreFrom.nextElementSibling && moreFrom.nextElementSibling.querySelector("a");
      moreFrom = null;
      if (first) first.focus();
    }
    freshBar();
  });
})();

(function () {
  "use strict";

  var NAME_KEY = "hitl.reviewer";

  function storage(kind) {
    try {
      return window[kind]; // may throw when storage is disabled
    } catch (e) {
      return null;
    }
  }

  function read(kind, key) {
    var store = storage(kind);
    return store ? store.getItem(key) : null;
  }

  function write(kind, key, value) {
    var store = storage(kind);
    if (!store) return;
    try {
      if (value) store.setItem(key, value);
      else store.removeItem(key);
    } catch (e) { /* quota or privacy mode: remembering is best effort */ }
  }

  function fill(root) {
    if (!root.querySelectorAll) return;
    root.querySelectorAll('input[name="reviewer"]').forEach(function (input) {
      if (!input.value) input.value = read("localStorage", NAME_KEY) || "";
    });
    root.querySelectorAll("form[data-draft]").forEach(function (form) {
      var comment = form.elements.namedItem("comment");
      if (comment && !comment.value) comment.value = read("sessionStorage", form.dataset.draft) || "";
    });
  }

  document.addEventListener("input", function (event) {
    var field = event.target;
    if (field.name === "reviewer") write("localStorage", NAME_KEY, field.value.trim());
    if (field.name === "comment" && field.form && field.form.dataset.draft) {
      write("sessionStorage", field.form.dataset.draft, field.value);
    }
  });

  // A recorded decision needs its draft no more.
  document.addEventListener("htmx:afterRequest", function (event) {
    var form = event.detail.elt;
    if (event.detail.successful && form.dataset && form.dataset.draft) {
      write("sessionStorage", form.dataset.draft, "");
    }
  });

  // A new attempt up for review makes the last notice (recorded, or not) old news.
  document.addEventListener("htmx:sseMessage", function (event) {
    var flash = document.getElementById("flash");
    if (event.detail.type === "review" && flash && event.target.querySelector("fieldset:enabled")) {
      flash.replaceChildren();
    }
  });

  // htmx fires htmx:load for the page and for everything it swaps in.
  document.addEventListener("htmx:load", function (event) { fill(event.target); });
  document.addEventListener("DOMContentLoaded", function () { fill(document); });

  // Say whether the page's stream is connected ("Live") or coming back after a restart.
  var LIVE = { open: "Live", lost: "Reconnecting…", closed: "" };
  function connection(state) {
    return function (event) {
      var root = event.target.closest && event.target.closest("[sse-connect]");
      if (!root) return;
      root.dataset.live = state;
      root.querySelectorAll(".live").forEach(function (label) { label.textContent = LIVE[state]; });
    };
  }
  document.addEventListener("htmx:sseOpen", connection("open"));
  document.addEventListener("htmx:sseError", connection("lost"));
  document.addEventListener("htmx:sseClose", connection("closed"));

  function age(seconds) {
    var units = [["d", 86400], ["h", 3600], ["min", 60]];
    for (var i = 0; i < units.length; i++) {
      if (seconds >= units[i][1]) return Math.floor(seconds / units[i][1]) + " " + units[i][0];
    }
    return Math.max(0, Math.floor(seconds)) + " s";
  }

  window.setInterval(function () {
    document.querySelectorAll("time[data-age]").forEach(function (time) {
      var then = Date.parse(time.dateTime);
      if (!isNaN(then)) time.textContent = age((Date.now() - then) / 1000);
    });
  }, 5000);
})();
