/* The relay's login form: POST /login with the admin token as a bearer; the answer sets a session cookie. */
"use strict";

document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const message = document.getElementById("message");
  const token = document.getElementById("token").value.trim();
  message.className = "message";
  message.textContent = "";
  let response;
  try {
    response = await fetch("/login", { method: "POST", headers: { Authorization: `Bearer ${token}` } });
  } catch (err) {
    message.className = "message error";
    message.textContent = "cannot reach the relay";
    return;
  }
  if (response.ok) {
    window.location.replace("/");
    return;
  }
  let text = `${response.status} ${response.statusText}`;
  try { text = (await response.json()).error || text; } catch (err) { /* keep the status line */ }
  message.className = "message error";
  message.textContent = text;
});
