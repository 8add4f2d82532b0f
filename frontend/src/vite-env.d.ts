/// <reference types="vite/client" />

interface ImportMetaEnv {
  readonly VITE_CHATKIT_API_URL?: string;
  readonly VITE_CHATKIT_DOMAIN_KEY?: string;
  readonly VITE_DEV_TOKEN_URL?: string;
  readonly VITE_CHATKIT_GREETING?: string;
  readonly VITE_MAX_UPLOAD_BYTES?: string;
  readonly VITE_BACKEND_URL?: string;
}

interface ImportMeta {
  readonly env: ImportMetaEnv;
}

interface Window {
  /** Set by index.html when ChatKit's CDN script fails to load. */
  chatkitScriptFailed?: boolean;
}
