// hitl's own script, loaded as a file (the Content-Security-Policy forbids inline script).
// Progressive enhancement only; every form works without it. It:
//  - remembers the reviewer's name in localStorage,
//  - keeps a half-written comment when a live update (or a reconnect) redraws the form,
//  - shows whether the live stream is connected,
//  - keeps the dashboard's "age" column fresh,
//  - sends the session's CSRF token with htmx's requests (X-CSRF-Token, from the page's
//    meta tag), and fills the token into forms a stream swapped in without one.
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

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  // Only to our own origin: the token must never travel to another site.
  document.addEventListener("htmx:configRequest", function (event) {
    var token = csrfToken();
    var url = new URL(event.detail.path, window.location.href);
    if (token && url.origin === window.location.origin) {
      event.detail.headers["X-CSRF-Token"] = token;
    }
  });

  function fill(root) {
    if (!root.querySelectorAll) return;
    root.querySelectorAll('input[name="csrf_token"]').forEach(function (input) {
      if (!input.value) input.value = csrfToken();
    });
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
