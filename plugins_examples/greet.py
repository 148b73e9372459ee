"""Greet a user and count the users who share their last name (the hot-require blog post's).

Args: {"firstName": "Blain", "lastName": "Smith"}
"""


async def main(ctx, args):
    same = await ctx.db.users.count_documents({"lastName": args["lastName"]})
    return (
        f"Hello there, {args['firstName']}!!! "
        f"There are {same} with the same last name as you!"
    )
