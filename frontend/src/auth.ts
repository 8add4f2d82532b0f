// The one place where this app learns who the user is.
//
// chatkit-pg accepts `Authorization: Bearer <JWT>` on every request: tokens signed with its
// JWT_SECRET, or issued by your identity provider (JWT_JWKS_URL); docs/configuration.md,
// "Authentication".
// Replace the body of getAuthToken with your sign-in library's call, for example
//   return (await auth0.getTokenSilently()) ?? null;
//   return (await supabase.auth.getSession()).data.session?.access_token ?? null;
// It is called before every ChatKit request, so return a cached token and refresh it there.
import { DEV_TOKEN_URL } from "./config";

let devToken: { value: string; fetchedAt: number } | null = null;

/** The current user's bearer token, or null when nobody is signed in. */
export async function getAuthToken(): Promise<string | null> {
  if (!DEV_TOKEN_URL) return null;
  // Development: the backend's token for its development user (valid 24 h; refetched hourly).
  if (devToken === null || Date.now() - devToken.fetchedAt > 3600 * 1000) {
    const response = await fetch(DEV_TOKEN_URL, { cache: "no-store" });
    if (!response.ok) throw new Error(`${DEV_TOKEN_URL} answered ${response.status}`);
    const body: { token: string } = await response.json();
    devToken = { value: body.token, fetchedAt: Date.now() };
  }
  return devToken.value;
}

/** ChatKit's api.fetch: every request to the backend carries the user's token. */
export const authFetch: typeof fetch = async (input, init) => {
  const headers = new Headers(init?.headers);
  const token = await getAuthToken();
  if (token) headers.set("Authorization", `Bearer ${token}`);
  return fetch(input, { ...init, headers });
};
