// Lamina dashboard: the few things htmx does not do. Every write is JSON (the gateway takes no other body).
"use strict";

async function postJSON(path, body) {
  return fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    credentials: "same-origin",
  });
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error.message;
  } catch (e) {
    return "HTTP " + response.status;
  }
}

function onLogin(form) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const response = await postJSON("/ui/login", { key: document.getElementById("key").value });
    if (response.ok) {
      window.location.reload();
    } else {
      document.getElementById("login-error").textContent = await errorText(response);
    }
  });
}

function onPlayground(form) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = document.getElementById("pg-send");
    const answer = document.getElementById("answer");
    button.disabled = true;
    answer.textContent = "Asking…";
    try {
      const response = await postJSON("/ui/chat", {
        model: document.getElementById("pg-model").value,
        message: document.getElementById("pg-message").value,
      });
      if (response.headers.get("content-type", "").startsWith("text/html")) {
        answer.innerHTML = await response.text();
      } else {
        answer.textContent = await errorText(response);
      }
    } finally {
      button.disabled = false;
    }
  });
}

function liveChart(element) {
  if (typeof uPlot === "undefined") return;
  const times = [], rates = [], p95 = [];
  const plot = new uPlot(
    {
      width: Math.max(320, element.clientWidth),
      height: 200,
      series: [
        {},
        { label: "requests/s", stroke: "#2f6fde", scale: "rate" },
        { label: "p95 ms", stroke: "#d9822b", scale: "ms" },
      ],
      axes: [{}, { scale: "rate" }, { scale: "ms", side: 1, grid: { show: false } }],
    },
    [times, rates, p95],
    element,
  );
  async function poll() {
    try {
      const response = await fetch("/ui/api/summary", { credentials: "same-origin" });
      if (!response.ok) return;
      const summary = await response.json();
      times.push(Date.now() / 1000);
      rates.push(summary.figures.requests_per_s);
      p95.push(summary.figures.p95_ms);
      if (times.length > 150) { times.shift(); rates.shift(); p95.shift(); }
      plot.setData([times, rates, p95]);
    } catch (e) {
      // the gateway is restarting: the next poll tries again
    }
  }
  poll();
  setInterval(poll, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  const login = document.getElementById("login");
  if (login) onLogin(login);
  const playground = document.getElementById("playground");
  if (playground) onPlayground(playground);
  const chart = document.getElementById("chart");
  if (chart) liveChart(chart);
  const logout = document.getElementById("logout");
  if (logout) {
    logout.addEventListener("click", async () => {
      await postJSON("/ui/logout", {});
      window.location.reload();
    });
  }
});
