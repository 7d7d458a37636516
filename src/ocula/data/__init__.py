"""Reading and checking data: images, dataset formats, the dataset registry."""
