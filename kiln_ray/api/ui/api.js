// Every call the page makes goes through `request`: it adds `Authorization: Bearer <key>`
// when the user saved a key, and turns an OpenAI-style error body
// ({"error": {"message", "type", "code"}}) into an ApiError the panels show as text.

const KEY_STORAGE = "kiln-ray.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function saveApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

export class ApiError extends Error {
  constructor(status, message, type = null, code = null, param = null) {
    super(message);
    this.status = status; // 0: the server could not be reached
    this.type = type;
    this.code = code;
    this.param = param;
  }

  // "400 invalid_request_error: ... (param: x)"
  describe() {
    const where = this.param && !this.message.includes(this.param) ? ` (${this.param})` : "";
    const status = this.status ? `${this.status} ` : "";
    return `${status}${this.code || this.type || "error"}: ${this.message}${where}`;
  }
}

// 401 / 403 reach every listener (the page shows one banner for them).
const authListeners = [];

export function onAuthFailure(listener) {
  authListeners.push(listener);
}

export function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The error an error body describes; `body` is the parsed JSON (or null when it was not JSON).
export function errorFromBody(status, body, fallback) {
  const e = body && typeof body === "object" ? body.error : null;
  if (e && typeof e === "object") return new ApiError(status, String(e.message || fallback), e.type, e.code, e.param);
  if (body && typeof body.detail === "string") return new ApiError(status, body.detail);
  return new ApiError(status, fallback);
}

async function errorFrom(response) {
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    body = null;
  }
  const error = errorFromBody(response.status, body, text.slice(0, 300) || response.statusText);
  if (response.status === 401 || response.status === 403) {
    for (const listener of authListeners) listener(error);
  }
  return error;
}

// fetch `path` with the API key; `json` is sent as a JSON body, `form` as multipart.
// Resolves to the Response when it is 2xx, else throws ApiError.
export async function request(method, path, { json, form, signal } = {}) {
  const headers = { ...authHeaders() };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser sets the multipart boundary and the Content-Length
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `cannot reach the server (${error.message})`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function api(method, path, options) {
  const response = await request(method, path, options);
  return response.json();
}

export const get = (path) => api("GET", path);
export const post = (path, json) => api("POST", path, { json });
export const del = (path) => api("DELETE", path);

export function describe(error) {
  return error instanceof ApiError ? error.describe() : String(error && error.message ? error.message : error);
}
