// Everything a deployment changes, from the environment at build time (Vite's VITE_* variables;
// see .env.example). The defaults suit the docker-compose deployment, where nginx serves this
// app and proxies /chatkit and /files to the backend on the same origin.
import type { StartScreenPrompt } from "@openai/chatkit";

const env = import.meta.env;

/** The ChatKit endpoint of chatkit-pg: relative (same origin) or absolute (needs CORS_ORIGINS). */
export const CHATKIT_API_URL: string = env.VITE_CHATKIT_API_URL || "/chatkit";

/**
 * The domain key OpenAI issues for your registered domain
 * (https://platform.openai.com/settings/organization/security/domain-allowlist).
 * On localhost a placeholder is accepted.
 */
export const CHATKIT_DOMAIN_KEY: string = env.VITE_CHATKIT_DOMAIN_KEY || "domain_pk_localhost_dev";

/**
 * Where src/auth.ts gets a development token: chatkit-pg's GET /dev/token, which exists only
 * while the backend runs without JWT settings. Empty in production builds unless set.
 */
export const DEV_TOKEN_URL: string =
  env.VITE_DEV_TOKEN_URL ?? (env.DEV ? new URL("/dev/token", new URL(CHATKIT_API_URL, location.href)).href : "");

export const GREETING: string = env.VITE_CHATKIT_GREETING || "What can I help with today?";

export const STARTER_PROMPTS: StartScreenPrompt[] = [
  { label: "What can you do?", prompt: "Hello! What can you do?", icon: "circle-question" },
  { label: "Write a haiku", prompt: "Write a haiku about PostgreSQL.", icon: "write" },
  { label: "Explain", prompt: "Explain row-level security in one paragraph.", icon: "book-open" },
];

/** Must match the backend's MAX_UPLOAD_BYTES (the backend enforces it either way). */
export const MAX_UPLOAD_BYTES: number = Number(env.VITE_MAX_UPLOAD_BYTES || 20 * 1024 * 1024);
