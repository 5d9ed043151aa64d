// hitl's own script, loaded as a file (the Content-Security-Policy forbids inline script).
// Progressive enhancement only; every form works without it. It:
//  - remembers the reviewer's name in localStorage,
//  - keeps a half-written comment when a live update (or a reconnect) redraws the form,
//  - shows whether the live stream is connected,
//  - keeps the dashboard's "age" column fresh,
//  - sends the session's CSRF token with htmx's requests (X-CSRF-Token, from the page's
//    meta tag), and fills the token into forms a stream swapped in without one.
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

  // A reservation shows until it runs out ("Ann is reviewing"): past then, it is hidden
  // (the store no longer counts it; the next render leaves it out).
  function expire() {
    document.querySelectorAll(".reserved[data-until]").forEach(function (held) {
      var until = Date.parse(held.dataset.until);
      if (!isNaN(until) && until <= Date.now()) held.hidden = true;
    });
  }
  // A review's deadline counts down each second ("in 4 min 05 s"), as the server
  // renders it (pages.countdown); at zero, "now": the timeout's decision follows live.
  function countdown(seconds) {
    seconds = Math.floor(seconds);
    if (seconds <= 0) return "now";
    var h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    function two(n) { return (n < 10 ? "0" : "") + n; }
    if (h) return "in " + h + " h " + two(m) + " min";
    return m ? "in " + m + " min " + two(s) + " s" : "in " + s + " s";
  }
  function tick() {
    document.querySelectorAll("time[data-deadline]").forEach(function (time) {
      var due = Date.parse(time.dateTime);
      if (!isNaN(due)) time.textContent = countdown((due - Date.now()) / 1000);
    });
  }
  window.setInterval(tick, 1000);
  document.addEventListener("htmx:afterSwap", tick);

  document.addEventListener("DOMContentLoaded", expire);
  document.addEventListener("htmx:afterSwap", expire);

  window.setInterval(function () {
    document.querySelectorAll("time[data-age]").forEach(function (time) {
      var then = Date.parse(time.dateTime);
      if (!isNaN(then)) time.textContent = age((Date.now() - then) / 1000);
    });
    expire();
  }, 5000);
})();

// ---- Task page: local times, keys, attempts left open, unsent comments kept ----
// Its own closure, apart from the rest: it shares nothing but the page with it.
(function () {
  "use strict";

  // Times are written in UTC by the server (kept as the tooltip); show local time.
  function localise(root) {
    if (!root.querySelectorAll) return;
    root.querySelectorAll("time[data-local]").forEach(function (time) {
      var when = new Date(time.dateTime);
      if (isNaN(when.getTime())) return;
      var today = when.toDateString() === new Date().toDateString();
      time.textContent = today ? when.toLocaleTimeString() : when.toLocaleString();
    });
  }
  document.addEventListener("DOMContentLoaded", function () { localise(document); });
  document.addEventListener("htmx:load", function (event) { localise(event.target); });

  // Keys: a approves, r moves to the comment (to reject), n opens the next task waiting.
  // Never while typing in a field, nor with a modifier (the browser's own shortcuts).
  var KEYS = {
    a: '.decision-form button[value="approved"]',
    r: ".decision-form textarea[name=comment]",
    n: 'a[data-key="n"]'
  };
  function typing(element) {
    return element.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(element.tagName);
  }
  document.addEventListener("keydown", function (event) {
    var task = document.querySelector("article.task");
    if (!task || !Object.prototype.hasOwnProperty.call(KEYS, event.key) || event.repeat
        || event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey
        || typing(event.target)) return;
    var target = task.querySelector(KEYS[event.key]);
    if (!target || target.matches(":disabled")) return;
    event.preventDefault(); // so the r is not typed into the comment it moves to
    if (event.key === "r") target.focus();
    else target.click();
  });

  // An attempt the reader opened (or closed) stays so when the history is redrawn.
  var opened = {};
  document.addEventListener("click", function (event) {
    var summary = event.target.closest && event.target.closest("details.attempt > summary");
    if (summary) opened[summary.parentNode.dataset.attempt] = !summary.parentNode.open;
  });
  document.addEventListener("htmx:sseMessage", function (event) {
    if (event.detail.type !== "history") return;
    event.target.querySelectorAll("details.attempt[data-attempt]").forEach(function (details) {
      var open = opened[details.dataset.attempt];
      if (open !== undefined) details.open = open;
    });
  });

  // A half-written comment survives a live update of the review card: it moves into
  // the new form, or (once the task has ended) into a box of its own, and a notice
  // says who decided meanwhile. This page's own decision clears it, once recorded.
  var mine = {}; // attempt -> comment: this page's decisions (dropped if not recorded)
  var carried = null; // {attempt, text}: the comment in the form a live update replaces

  function commentIn(root) {
    return root ? root.querySelector(".decision-form textarea[name=comment]") : null;
  }
  function isDecisionForm(element) {
    return element && element.classList && element.classList.contains("decision-form");
  }

  function notice(decided, attempt) {
    if (decided && decided.dataset.attempt === attempt) {
      return "Attempt " + attempt + " was " + decided.querySelector("strong").textContent
        + " by " + decided.querySelector(".reviewer").textContent
        + " while you were writing; your comment was not sent.";
    }
    var status = document.querySelector("#task-status [data-status]");
    return "The task is " + (status ? status.textContent : "no longer waiting for you")
      + " now; your comment was not sent.";
  }

  // A read-only place for text the page could not send, so it is never lost silently.
  function unsent(id, label, rows, text) {
    var title = document.createElement("label");
    title.htmlFor = id;
    title.textContent = label;
    var copy = document.createElement("textarea");
    copy.id = id;
    copy.rows = rows;
    copy.value = text;
    return [title, copy];
  }

  function put(field, text) {
    field.value = text;
    field.dispatchEvent(new Event("input", { bubbles: true })); // saved as its draft too
  }

  function keep(text, attempt) {
    var box = document.getElementById("comment-kept");
    var review = document.getElementById("task-review");
    if (!box || !review) return;
    var field = commentIn(review);
    var message = document.createElement("p");
    message.className = "notice notice-warn";
    message.textContent = notice(review.querySelector(".decided"), attempt)
      + (field ? " It is kept in the form below." : " Here it is:");
    box.replaceChildren(message);
    if (field) {
      put(field, text);
      return;
    }
    box.append.apply(box, unsent("kept-text", "Your unsent text", 3, text));
  }

  function attemptOf(form) {
    return form.elements.namedItem("attempt").value;
  }
  document.addEventListener("htmx:beforeRequest", function (event) {
    var form = event.detail.elt;
    if (isDecisionForm(form)) mine[attemptOf(form)] = form.elements.namedItem("comment").value;
  });
  // The answer lands in #flash; the form that asked may be gone by then (a live update
  // replaced it), and htmx's afterRequest on a detached form reaches no listener.
  document.addEventListener("htmx:afterSwap", function (event) {
    var config = event.detail.requestConfig;
    if (event.target.id !== "flash" || !config || !isDecisionForm(config.elt)) return;
    var attempt = attemptOf(config.elt), sent = mine[attempt] || "";
    var box = document.getElementById("comment-kept");
    if (event.detail.xhr.status < 300) {
      if (box) box.replaceChildren();
      return;
    }
    delete mine[attempt]; // not recorded
    if (event.detail.xhr.status === 409 && sent.trim()) keep(sent, attempt); // another was first
  });

  document.addEventListener("htmx:sseBeforeMessage", function (event) {
    if (event.detail.type !== "review") return;
    var field = commentIn(event.target);
    carried = field && field.value.trim()
      ? { attempt: attemptOf(field.form), text: field.value } : null;
  });
  document.addEventListener("htmx:sseMessage", function (event) {
    if (event.detail.type !== "review" || !carried) return;
    var text = carried.text, attempt = carried.attempt;
    carried = null;
    var decided = event.target.querySelector(".decided");
    var voted = decided || event.target.querySelector(".my-vote"); // a quorum's own vote
    if (voted && Object.prototype.hasOwnProperty.call(mine, voted.dataset.attempt)) {
      return; // this page's own decision, or a lost race its answer will tell
    }
    var field = commentIn(event.target);
    if (field && !(decided && decided.dataset.attempt === attempt)) {
      put(field, text); // no news about the attempt it was written on: carry it on
    } else {
      keep(text, attempt); // decided by someone else, or the form is gone: say so
    }
  });
  // A half-done edit survives a live update of the review card too (another reviewer's
  // vote re-renders it): on the same attempt it moves into the new Edit form, opened;
  // once the attempt changed, it is kept in a box of its own, never sent unseen.
  var editing = null; // {attempt, text}: an edit the update replaces, changed from the output
  var editOpen = null; // the attempt whose Edit box the reader opened
  function editIn(root) {
    return root ? root.querySelector(".edit-form textarea[name=edited_output]") : null;
  }
  document.addEventListener("htmx:sseBeforeMessage", function (event) {
    if (event.detail.type !== "review") return;
    var field = editIn(event.target);
    editOpen = field && field.closest("details").open ? attemptOf(field.form) : null;
    editing = field && field.value !== field.defaultValue
      ? { attempt: attemptOf(field.form), text: field.value } : null;
  });
  document.addEventListener("htmx:sseMessage", function (event) {
    if (event.detail.type !== "review") return;
    var field = editIn(event.target);
    var same = field && attemptOf(field.form);
    if (field && editOpen !== null && same === editOpen) field.closest("details").open = true;
    editOpen = null;
    if (!editing) return;
    var kept = editing;
    editing = null;
    if (field && same === kept.attempt) {
      field.value = kept.text;
      return;
    }
    var box = document.getElementById("comment-kept");
    if (!box) return;
    var message = document.createElement("p");
    message.className = "notice notice-warn";
    message.textContent = "Attempt " + kept.attempt + " is no longer under review; "
      + "your edit was not sent. Here it is:";
    box.replaceChildren.apply(box, [message].concat(unsent("kept-edit", "Your unsent edit", 6,
                                                           kept.text)));
  });
})();
