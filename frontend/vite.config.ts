import { defineConfig, loadEnv } from "vite";

// `npm run dev` serves the app on http://localhost:5173 and forwards the backend's paths to
// VITE_BACKEND_URL (default: `make run`'s http://127.0.0.1:8000), so the browser sees one
// origin and no CORS setting is needed. `npm run build` writes dist/ for nginx.
export default defineConfig(({ mode }) => {
  const backend = loadEnv(mode, ".", "VITE_").VITE_BACKEND_URL || "http://127.0.0.1:8000";
  const proxy = { target: backend, changeOrigin: false };
  return {
    server: {
      host: "localhost",
      port: 5173,
      proxy: { "/chatkit": proxy, "/files": proxy, "/dev/token": proxy },
    },
    build: { outDir: "dist", sourcemap: true },
  };
});
