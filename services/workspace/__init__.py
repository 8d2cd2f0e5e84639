"""The workspace: pages for the people who act (report a child, inbox, referrals, cases,
coordination), a backend-for-frontend over the four public APIs. It owns no case data."""
