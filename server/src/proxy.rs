//! Ports other than envd's, proxied into the sandbox through the agent.
